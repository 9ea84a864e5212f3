"""The one training loop: `train_and_evaluate(config, workdir, make_task)` for every training task.

The path of one batch: the grain iterator (crate_jax/data) yields this process's rows ->
`sharding.global_batch` forms global arrays on the mesh -> the task's jitted, donated step
updates the sharded state -> metrics go to `metrics.MetricsLog`, checkpoints (state +
iterator) to Orbax through `checkpoint.save_train_state`. What differs between tasks (the
model, the step, the evaluation) comes in a `Task` (crate_jax/pretrain.py for MAE
pretraining); this module imports no task: the table from `config.task` to its task is in
crate_jax/main.py.

Between log steps the host never waits for the device: the loop runs under
`jax.transfer_guard("disallow")`, a finished step's metrics are fetched after the next step
is dispatched, and preemption is agreed through JAX's coordination service
(crate_jax/preemption.py), not a device collective.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from clu import periodic_actions
from etils import epath

from crate_jax import checkpoint, data, models, preemption, provenance, sharding, step, storage, watchdog
from crate_jax.metrics import MetricsLog, Throughput


@dataclasses.dataclass(frozen=True)
class Task:
    model_spec: dict[str, Any]  # {"name", "overrides"}: stored in every checkpoint
    init_variables: Callable[[jax.Array], Any]  # key -> flax variables with logical axis names
    make_optimizer: Callable[[Any], Any]  # abstract params -> optax transformation
    make_step: Callable[[Any], Callable]  # tx -> step(state, batch) -> (state, metrics)
    evaluate: Callable[..., None]  # (state, step, mesh, log, workdir) -> None; logs its own metrics
    initial_params: Callable[[Any], Any]  # abstract params -> params to start from, or None
    train_transform: str
    flops_per_step: float = 0.0  # analytic; 0 = XLA's cost analysis (which counts a scanned layer once)


def validate_config(config, num_devices: int, num_processes: int) -> None:
    """The checks that need no data: model fields, mesh, batch divisibility, step counts.
    One-line errors naming the config key (also used by tools.aot_compile for topologies)."""
    models.model_fields(config.model.name, **{k: v for k, v in config.model.items() if k != "name"})
    shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, num_devices), strict=True))
    sharding.update_axes(config)
    batch_shards = shape["slices"] * shape["data"] * shape["fsdp"]
    if config.grad_accum_steps < 1:
        raise ValueError(f"config.grad_accum_steps={config.grad_accum_steps} must be >= 1")
    if config.batch_size % (batch_shards * config.grad_accum_steps):
        raise ValueError(
            f"config.batch_size={config.batch_size} is not divisible by the {batch_shards} batch-sharding devices "
            f"x config.grad_accum_steps={config.grad_accum_steps}"
        )
    if config.batch_size % num_processes:
        raise ValueError(f"config.batch_size={config.batch_size} is not divisible by {num_processes} processes")
    for key in ("total_steps", "log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
        if config[key] < 1:
            raise ValueError(f"config.{key}={config[key]} must be >= 1")
    if (warmup := config.optim.warmup_steps) >= config.total_steps:
        raise ValueError(f"config.optim.warmup_steps={warmup} must be below config.total_steps={config.total_steps}")


def validate(config, num_devices: int) -> None:
    """`validate_config`, then that the splits exist: everything fails before compiling."""
    validate_config(config, num_devices, jax.process_count())
    watchdog.beat("reading (or building) the dataset")
    # A missing split fails now, not at the first evaluation (pretraining's completion split too).
    for split in (config.data.split, config.data.eval_split, config.get("completion_split")):
        if split:
            data.num_examples(config.data.name, split, config.data.data_dir or None, backend=config.data.backend)
    for name in (config.data.transform, config.data.eval_transform):  # and a bad transform name or option
        data.get_transform(name, config.model.image_size, **transform_options(config, name))


def transform_options(config, transform: str) -> dict[str, Any]:
    """config.data's values of the options `transform` takes (data.TRANSFORM_OPTIONS)."""
    options = {}
    for key in data.TRANSFORM_OPTIONS.get(transform, ()):
        if key not in config.data:
            raise ValueError(f"transform {transform!r} needs config.data.{key} (see configs/finetune.py)")
        value = config.data[key]
        options[key] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
    return options


def iterator(config, *, split, transform, batch_size, shuffle, num_epochs=None, drop_remainder=True, start_batch=0):
    """The config's input pipeline for one split."""
    return data.make_iterator(
        name=config.data.name,
        split=split,
        data_dir=config.data.data_dir or None,
        image_size=config.model.image_size,
        transform=transform,
        transform_options=transform_options(config, transform),
        global_batch_size=batch_size,
        seed=config.seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        worker_count=config.data.worker_count,
        prefetch_buffer_size=config.data.prefetch,
        drop_remainder=drop_remainder,
        start_batch=start_batch,
        backend=config.data.backend,
    )


def eval_batches(config, mesh) -> Iterator[dict[str, jax.Array]]:
    """Up to `config.eval_steps` global batches of the held-out split, in a fixed order."""
    it = iterator(
        config,
        split=config.data.eval_split,
        transform=config.data.eval_transform,
        batch_size=config.eval_batch_size,
        shuffle=False,
        num_epochs=1,
        drop_remainder=False,
    )
    count = 0
    for count, local in enumerate(it, start=1):
        yield sharding.global_batch(local, mesh)
        watchdog.beat(f"evaluation batch {count}")
        if count >= config.eval_steps:
            break
    if count == 0:
        raise ValueError(f"config.data.eval_split={config.data.eval_split!r} yielded no batch")


def train_and_evaluate(config, workdir: str, make_task: Callable[[Any], Task]) -> dict[str, float]:
    """Train the task `make_task(config)` builds, resuming from `workdir` if it holds a
    checkpoint. Returns the last training metrics. (`crate_jax.main.run(config, workdir)`
    picks `make_task` from `config.task`.)"""
    if config.matmul_precision != "default":
        jax.config.update("jax_default_matmul_precision", config.matmul_precision)
    validate(config, jax.device_count())
    return fit(config, workdir, make_task(config))


def fit(config, workdir: str, task: Task) -> dict[str, float]:
    workdir = storage.makedirs(workdir)  # local or gs:// (crate_jax/storage.py)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.axis_rules(config)
    abstract, shardings, tx = step.abstract_state_from(
        task.init_variables, task.make_optimizer, mesh, rules, sharding.update_axes(config)
    )
    if mesh.size > mesh.shape["data"] and (unsharded := sharding.check_sharded(abstract.params, shardings.params)):
        logging.warning("large parameters left replicated by config.axis_rules: %s", unsharded)

    log = MetricsLog(str(workdir))
    meta = {
        "model": task.model_spec,
        "task": config.task,
        "config": json.loads(config.to_json_best_effort()),
        "provenance": provenance.collect(),
        "process_count": jax.process_count(),
    }
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(json.dumps({k: meta[k] for k in ("config", "provenance")}, indent=2))
    mngr = checkpoint.make_manager(
        workdir / checkpoint.CHECKPOINT_SUBDIR,
        max_to_keep=config.keep_checkpoints,
        save_interval_steps=config.checkpoint_every_steps,
    )

    def train_iterator(start_batch: int = 0):
        return iterator(
            config,
            split=config.data.split,
            transform=task.train_transform,
            batch_size=config.batch_size,
            shuffle=config.data.shuffle,
            start_batch=start_batch,
        )

    watchdog.beat("building the input pipeline")
    train_it = train_iterator()
    watchdog.beat("restoring or initialising the state")
    if mngr.latest_step() is not None:
        targets = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        state, _, start, data_restored = checkpoint.restore_train_state(mngr, targets, train_it, jax.process_count())
        if not data_restored:
            logging.warning(
                "checkpoint at step %d was written by another process count; re-positioning the input "
                "pipeline deterministically to global batch %d",
                start,
                start,
            )
            train_it = train_iterator(start_batch=start)
        logging.info("resumed from step %d in %s", start, mngr.directory)
    else:
        initial = task.initial_params(abstract.params)
        state = step.init_state_from(task.init_variables, tx, config.seed, shardings, mesh, rules, params=initial)
        start = 0
        if initial is not None:
            logging.info("initialised from %s", config.init_from)
    watchdog.beat("state ready")

    train_step = step.jit_train_step(task.make_step(tx), shardings, mesh)
    hooks = [periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=log.writer)]
    # jax's profiler writes local files only: into the log's local mirror, copied into the workdir
    profiler = _Profiler(log.local_dir / "profile", config.profile_steps) if jax.process_index() == 0 else None
    if start == 0:
        log.hparams({k: v for k, v in _flat(meta["config"]).items() if isinstance(v, int | float | str | bool)})

    stopper = preemption.Preemption()
    throughput = Throughput()
    flops_per_step = 0.0
    last: dict[str, float] = {}
    pending = None  # (step number, metrics on device): fetched after the next step is dispatched

    def finish(pending) -> dict[str, float]:
        n, metrics = pending
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        watchdog.beat(f"train step {n}")
        if not np.isfinite(metrics["loss"]):
            raise FloatingPointError(
                f"loss is {metrics['loss']} at step {n}; last good checkpoint: step {mngr.latest_step()} "
                f"in {mngr.directory}"
            )
        if n % config.log_every_steps == 0 or n == config.total_steps:
            rate = throughput.rate()
            metrics |= {"images_per_sec": rate, "images_per_sec_per_device": rate / jax.device_count()}
            if flops_per_step and rate:
                metrics["flops_per_step"] = flops_per_step
                if config.peak_flops_per_device > 0:
                    achieved = flops_per_step * rate / config.batch_size / jax.device_count()
                    metrics["mfu"] = achieved / config.peak_flops_per_device
            with jax.transfer_guard("allow"):
                log.scalars(n, metrics)
        return metrics

    # Implicit transfers fail inside the loop (the explicit device_get of the metrics is allowed;
    # the input batch's copy is allowed by name): a per-step host sync cannot creep in unnoticed.
    # Compiling, checkpoints, evaluations and log writes run with transfers allowed.
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules), jax.transfer_guard("disallow"):
            for n in range(start + 1, config.total_steps + 1):
                with jax.transfer_guard("allow"):  # the input batch: the one intended host-to-device copy
                    batch = sharding.global_batch(next(train_it), mesh)
                if n == start + 1:  # compile ahead of time, to report its cost
                    watchdog.beat("compiling the train step")
                    with jax.transfer_guard("allow"):
                        train_step, xla_flops = _compile(train_step, state, batch, log, n)
                    watchdog.beat("compiled the train step")
                    flops_per_step = task.flops_per_step or xla_flops
                    throughput.start()
                if profiler is not None:
                    profiler.before(n - start)
                state, metrics = train_step(state, batch)
                throughput.add(config.batch_size)
                if pending is not None:
                    last = finish(pending)
                pending = (n, metrics)
                if profiler is not None:
                    profiler.after(n - start, state)
                for hook in hooks:
                    hook(n)
                stop = stopper.stop(n)
                final = stop or n == config.total_steps
                if n % config.checkpoint_every_steps == 0 or final:
                    last, pending = finish(pending), None  # never save a non-finite state
                    throughput.pause()
                    watchdog.beat(f"saving step {n}")
                    with jax.transfer_guard("allow"):
                        checkpoint.save_train_state(mngr, n, state, train_it, dict(meta, step=n), force=final)
                    watchdog.beat(f"saved step {n}")
                    throughput.start()
                if stop:
                    with jax.transfer_guard("allow"):
                        mngr.wait_until_finished()
                    logging.warning("preempted: saved step %d, exiting", n)
                    break
                if n % config.eval_every_steps == 0 or n == config.total_steps:
                    throughput.pause()
                    watchdog.beat(f"evaluating at step {n}")
                    with jax.transfer_guard("allow"):
                        task.evaluate(state, n, mesh, log, workdir)
                    watchdog.beat(f"evaluated at step {n}")
                    throughput.start()
            if pending is not None:
                last = finish(pending)
    finally:
        stopper.close()
        if profiler is not None:
            profiler.close()
        mngr.wait_until_finished()
        mngr.close()
        log.flush()
    return last


class _Profiler:
    """A profiler trace of `num_steps` steps into `logdir`, starting with the second step
    after (re)start (the first includes compiling); `jax.profiler.ProfileData` reads it."""

    def __init__(self, logdir: epath.Path, num_steps: int):
        self.logdir, self.num_steps, self.running = logdir, num_steps, False

    def before(self, i: int) -> None:
        if self.num_steps > 0 and i == 2:
            jax.profiler.start_trace(str(self.logdir))
            self.running = True

    def after(self, i: int, state) -> None:
        if self.running and i >= 1 + self.num_steps:
            self.close(state)

    def close(self, state=None) -> None:
        if self.running:
            if state is not None:
                jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.running = False
            logging.info("profiler trace written to %s", self.logdir)


def _compile(train_step, state, batch, log: MetricsLog, n: int):
    """Compile ahead of time and report the compile time, memory and FLOPs per step."""
    t0 = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    cost = compiled.cost_analysis() or {}
    # XLA counts a scanned layer body once: tasks give an analytic count when they can.
    flops_per_step = float(cost.get("flops", 0.0)) * jax.device_count()
    info = {"compile_s": time.perf_counter() - t0}
    memory = compiled.memory_analysis()
    if memory is not None:
        info["temp_bytes_per_device"] = float(memory.temp_size_in_bytes)
        info["argument_bytes_per_device"] = float(memory.argument_size_in_bytes)
    logging.info("compiled the train step: %s", info)
    log.writer.write_texts(n, {"compile": json.dumps(info)})
    return compiled, flops_per_step


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out
