"""Where `gs://` paths go, and the few file operations that must also work on an object store.

The contract: with `STORAGE_EMULATOR_HOST=http://HOST:PORT` set, every `gs://` access of the
project goes to that endpoint (a local GCS emulator); unset, `gs://` is Google Cloud Storage
with the machine's default credentials. `configure()` derives what each library needs from
that one variable, and runs when `crate_jax` is imported, before etils, gcsfs or tensorstore
read their settings:
  etils.epath  `EPATH_USE_TF=false`: gs:// through fsspec/gcsfs, not TensorFlow's gfile
               (TF hard-codes its GCS endpoint, so gfile cannot reach an emulator)
  gcsfs        reads STORAGE_EMULATOR_HOST itself; anonymous token and no gRPC bucket-type
               probe (`GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`) against an emulator
  tensorstore  (Orbax's array writer) `TENSORSTORE_GCS_HTTP_URL` and a dummy
               `GOOGLE_AUTH_TOKEN_FOR_TESTING`
  google-cloud-storage (Orbax's bucket-layout check) reads STORAGE_EMULATOR_HOST itself

Object stores have no append and no rename: `write_text` replaces whole objects,
`move_tree` copies then deletes, and writers that only reach local disks (TensorFlow's
summary writer, jax's profiler) write into a local `Mirror` copied into the remote
directory (`Mirror.sync`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request

from etils import epath

EMULATOR_VARIABLE = "STORAGE_EMULATOR_HOST"


def emulator_url() -> str | None:
    """The emulator endpoint as http(s)://HOST:PORT, or None for Google Cloud Storage."""
    host = os.environ.get(EMULATOR_VARIABLE, "").strip().rstrip("/")
    if host in ("", "default"):  # gcsfs's spelling of "unset"
        return None
    return host if "://" in host else f"http://{host}"


def configure() -> None:
    """Point every library's gs:// access at the emulator, or at GCS. Idempotent."""
    import fsspec.config

    url = emulator_url()
    gcs = {
        # Orbax writes through tensorstore and other hosts write too: a cached listing of gcsfs's
        # would miss their objects, so every listing asks the store.
        "use_listings_cache": False
    }
    if url is None:
        os.environ.setdefault("EPATH_USE_TF", "false")  # one gs:// client (gcsfs) with or without an emulator
    else:
        os.environ[EMULATOR_VARIABLE] = url
        os.environ["EPATH_USE_TF"] = "false"
        os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"  # its bucket probe is gRPC, which emulators lack
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = url
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
        gcs["token"] = "anon"  # no credentials lookup (it would ask the metadata server)
    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {}).update(gcs)


def is_remote(path) -> bool:
    return "://" in os.fspath(path) and not os.fspath(path).startswith("file://")


def check_bucket(path) -> None:
    """With an emulator, fail at once with one line if it is down or the bucket is missing
    (the clients would otherwise retry for minutes)."""
    url = emulator_url()
    path = os.fspath(path)
    if url is None or not path.startswith("gs://"):
        return
    bucket = path[len("gs://") :].split("/", 1)[0]
    request = f"{url}/storage/v1/b/{urllib.parse.quote(bucket, safe='')}"
    try:
        with urllib.request.urlopen(request, timeout=10):
            pass
    except urllib.error.HTTPError as e:
        raise FileNotFoundError(
            f"bucket {bucket!r} of {path} is not on the storage emulator {EMULATOR_VARIABLE}={url} (HTTP {e.code})"
        ) from None
    except OSError as e:
        raise ConnectionError(f"{EMULATOR_VARIABLE}={url} (for {path}) is not reachable: {e}") from None


def makedirs(path) -> epath.Path:
    """`path` as an existing directory (object stores have none: only the bucket is checked)."""
    check_bucket(path)
    path = epath.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_text(path, text: str) -> None:
    """Replace the whole file or object (an object store cannot append)."""
    path = epath.Path(path)
    if not is_remote(path):
        tmp = path.parent / f".{path.name}.tmp"  # a local rename is atomic: no half-written file
        tmp.write_text(text)
        tmp.replace(path)
    else:
        path.write_text(text)  # an object upload is atomic


def read_text(path, default: str = "") -> str:
    path = epath.Path(path)
    return path.read_text() if path.exists() else default


def files_under(root) -> list[epath.Path]:
    """Every file below `root`, recursively (objects under a prefix on a store)."""
    out = []
    for child in epath.Path(root).iterdir():  # epath refuses `**` globs on gs://
        out += files_under(child) if child.is_dir() else [child]
    return sorted(out)


def copy_tree(src, dst) -> None:
    src, dst = epath.Path(src), epath.Path(dst)
    for f in files_under(src):
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        f.copy(target, overwrite=True)


def move_tree(src, dst) -> None:
    """Rename a directory; on an object store (no rename) copy every object, then delete."""
    src, dst = epath.Path(src), epath.Path(dst)
    if not is_remote(src):
        src.rename(dst)
        return
    copy_tree(src, dst)
    src.rmtree()


class Mirror:
    """A directory that writers needing a local disk write into, copied to `remote`.

    For a local `remote` the mirror is `remote` itself and `sync` does nothing."""

    def __init__(self, remote):
        self.remote = epath.Path(remote)
        if is_remote(remote):
            self.local = epath.Path(tempfile.mkdtemp(prefix="crate_jax_mirror_"))
        else:
            self.local = self.remote
        self._copied: dict[str, tuple[int, int]] = {}

    def sync(self) -> None:
        """Copy every new or changed local file to the remote directory."""
        if self.local == self.remote:
            return
        for f in files_under(self.local):
            stat = os.stat(f)  # the mirror is local
            key, version = os.fspath(f), (stat.st_size, stat.st_mtime_ns)
            if self._copied.get(key) == version:
                continue
            target = self.remote / f.relative_to(self.local)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(f.read_bytes())
            self._copied[key] = version
            logging.debug("copied %s to %s", f, target)
