"""Orbax checkpoints: one layout for training runs, imported weights and analysis.

A checkpoint directory (`WORKDIR/checkpoints`, or the `--out` of `tools.import_torch`)
holds Orbax steps with the items
  params     the model parameters (StandardSave)
  opt_state  the optimizer state (training only)
  data       the grain iterator state (training only, one file per process)
  meta       JSON: model name and overrides, step, resolved config, versions
so `load(DIR)` can rebuild the model from the directory alone.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from crate_jax import models, sharding, storage

CHECKPOINT_SUBDIR = "checkpoints"


def checkpoint_dir(path: str | epath.Path) -> epath.Path:
    """Accepts a workdir (with `checkpoints/`) or a checkpoint directory itself."""
    path = epath.Path(path)
    return path / CHECKPOINT_SUBDIR if (path / CHECKPOINT_SUBDIR).exists() else path


def make_manager(
    path, *, max_to_keep: int | None = None, save_interval_steps: int = 1, read_only: bool = False
) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_interval_steps=save_interval_steps,
        enable_async_checkpointing=not read_only,
        read_only=read_only,
        create=not read_only,
    )
    return ocp.CheckpointManager(epath.Path(path), options=options)


def model_spec(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """JSON-friendly model description: dtypes become their names."""
    clean = {k: (str(v) if k in ("dtype", "param_dtype") else v) for k, v in overrides.items()}
    return {"name": name, "overrides": clean}


def save_params(path, params, meta: dict[str, Any], step: int = 0, model_state=None) -> epath.Path:
    """Write a params-only checkpoint (what `tools.import_torch` produces); `model_state`
    (e.g. {"batch_stats": ...} of an imported linear probe) is stored as in training runs."""
    path = epath.Path(path) / CHECKPOINT_SUBDIR
    mngr = make_manager(path)
    items = dict(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta))
    if model_state:
        items["model_state"] = ocp.args.StandardSave(model_state)
    mngr.save(step, args=ocp.args.Composite(**items), force=True)
    mngr.wait_until_finished()
    mngr.close()
    return path


def _steps_newest_first(mngr: ocp.CheckpointManager, path) -> list[int]:
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"no checkpoint found in {path}")
    return steps


def read_meta(path) -> dict[str, Any]:
    path = checkpoint_dir(path)
    mngr = make_manager(path, read_only=True)
    step = _steps_newest_first(mngr, path)[0]
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_params(path, abstract_params) -> tuple[Any, dict[str, Any], int]:
    """Params (onto the shardings of `abstract_params`), meta and step of the newest
    readable step; a step that fails to restore is skipped with a warning."""
    path = checkpoint_dir(path)
    mngr = make_manager(path, read_only=True)
    errors = []
    for step in _steps_newest_first(mngr, path):
        try:
            out = mngr.restore(
                step,
                args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore()),
            )
            return out["params"], out["meta"], step
        except Exception as e:  # noqa: BLE001 - any unreadable step falls back to the previous one
            logging.warning("checkpoint step %d in %s is unreadable (%s); trying an earlier one", step, path, e)
            errors.append(f"step {step}: {e}")
    raise ValueError(f"no readable checkpoint in {path}: " + "; ".join(errors))


def load(path, **overrides) -> tuple[Any, Any]:
    """(model, params) from a checkpoint directory alone, whatever devices wrote it: the params
    on this process's first device (replicated over all devices with several processes).
    `overrides` change the model's non-structural fields (e.g. mask_ratio=0.0,
    scan_layers=False for analysis)."""
    meta = read_meta(path)
    spec = meta["model"]
    saved = models.build(spec["name"], **spec["overrides"])
    model = models.build(spec["name"], **dict(spec["overrides"], **overrides))
    # A target sharding of this run's devices: without one Orbax restores onto the saved device
    # layout and refuses a checkpoint written on another device count. One process: its first
    # device. Several: replicated over all devices, a global array the caller can reshard
    # (JAX's CPU backend cannot move a one-device array across processes).
    if jax.process_count() == 1:
        target = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    else:
        target = sharding.replicated(jax.sharding.Mesh(np.asarray(jax.devices()), ("all",)))
    abstract = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=target), models.abstract_params(saved)
    )
    params, _, _ = restore_params(path, abstract)
    return model, models.to_layout(params, model.scan_layers)


def save_train_state(
    mngr: ocp.CheckpointManager, step: int, state, iterator, meta: dict[str, Any], force=False
) -> bool:
    """Save params, optimizer state (and other model collections), the data iterator and
    meta together (asynchronously)."""
    import grain

    items = dict(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        data=grain.checkpoint.CheckpointSave(iterator),
        meta=ocp.args.JsonSave(meta),
    )
    if jax.tree.leaves(state.model_state):
        items["model_state"] = ocp.args.StandardSave(state.model_state)
    return mngr.save(step, args=ocp.args.Composite(**items), force=force)


def restore_train_state(mngr: ocp.CheckpointManager, abstract_state, iterator, process_count: int):
    """The newest readable step as (state, meta, step, data_restored).

    `abstract_state` carries the target shardings, so a run may resume on another mesh or
    device count. The iterator is restored in place when the checkpoint was written by as
    many processes as there are now (grain keeps one state per process); otherwise
    `data_restored` is False and the caller re-positions the pipeline."""
    import grain

    errors = []
    for step in _steps_newest_first(mngr, mngr.directory):
        try:
            meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            items = dict(
                params=ocp.args.StandardRestore(abstract_state.params),
                opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
            )
            if jax.tree.leaves(abstract_state.model_state):
                items["model_state"] = ocp.args.StandardRestore(abstract_state.model_state)
            same_processes = meta.get("process_count") == process_count
            if same_processes:
                items["data"] = grain.checkpoint.CheckpointRestore(iterator)
            out = mngr.restore(step, args=ocp.args.Composite(**items))
            state = abstract_state.replace(
                step=jax.device_put(np.int32(step), abstract_state.step.sharding),
                params=out["params"],
                opt_state=out["opt_state"],
                model_state=out["model_state"] if "model_state" in items else abstract_state.model_state,
            )
            return state, meta, step, same_processes
        except Exception as e:  # noqa: BLE001 - a truncated step falls back to the previous one
            logging.warning(
                "checkpoint step %d in %s is unreadable (%s); trying an earlier one", step, mngr.directory, e
            )
            errors.append(f"step {step}: {e}")
            _set_aside(mngr, step)
    raise ValueError(f"no readable checkpoint in {mngr.directory}: " + "; ".join(errors))


def _set_aside(mngr: ocp.CheckpointManager, step: int) -> None:
    """Move an unreadable step aside so training can save that step again; nothing is lost
    (on an object store, which cannot rename, its objects are copied, then deleted)."""
    import time

    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        src = epath.Path(mngr.directory) / str(step)
        dst = src.parent / f"{step}.unreadable-{int(time.time())}"
        storage.move_tree(src, dst)
        logging.warning("moved the unreadable step to %s", dst)
    multihost_utils.sync_global_devices(f"set aside checkpoint step {step}")
    mngr.reload()
