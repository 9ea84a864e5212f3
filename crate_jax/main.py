"""Entry point: `python -m crate_jax.main --config=configs/imagenet_mae.py --workdir=DIR`.

`run(config, workdir)` is the library call behind it (tests and the Colab use it): the table
from `config.task` to its task lives here, so the loop (train.py) imports no task.
"""

import functools
import logging

import jax
from absl import app, flags
from ml_collections import config_flags

from crate_jax import cluster, host_memory, pretrain, train, watchdog
from crate_jax.evaluation import finetune, knn, linear_probe

FLAGS = flags.FLAGS

# config.task -> its `train.Task` factory, for every task the loop trains (also tools.aot_compile).
TASKS = {
    "pretrain": pretrain.make_task,
    "finetune": finetune.make_task,
    "linear_probe": linear_probe.make_task,  # protocol "fair"
}


# config.task -> what runs it.
RUNS = {
    "pretrain": functools.partial(train.train_and_evaluate, make_task=pretrain.make_task),
    "finetune": functools.partial(train.train_and_evaluate, make_task=finetune.make_task),
    "linear_probe": linear_probe.run,  # protocol "fair" through train.train_and_evaluate, or "logistic"
    "knn": knn.run,
}


def run(config, workdir: str) -> dict[str, float]:
    """Run `config.task` into `workdir` under the hang watchdog (config.hang_timeout_s)."""
    if config.task not in RUNS:
        raise ValueError(f"config.task={config.task!r} is not one of {sorted(RUNS)}")
    with watchdog.Watchdog(config.hang_timeout_s):
        return RUNS[config.task](config, workdir)


def _define_flags() -> None:  # here, not at import: tools.aot_compile imports TASKS and has its own flags
    config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Checkpoints, metrics and images go here (local or gs://).")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, where JAX detects no cluster.")
    flags.DEFINE_integer("num_processes", None, "Number of processes, with --coordinator_address.")
    flags.DEFINE_integer("process_id", None, "This process's index, with --coordinator_address.")
    flags.DEFINE_bool(
        "keep_freed_memory",
        True,
        "On a CPU backend, keep freed memory in the process (glibc): XLA:CPU frees a step's temporaries "
        "and would page-fault them in again every step (crate_jax/host_memory.py).",
    )
    flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging.Filter):
    """Orbax logs every file it writes at INFO through absl; keep its warnings only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    logging.getLogger("absl").addFilter(_QuietLibraries())
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cluster.split_cpu_host_for(FLAGS.config, FLAGS.coordinator_address)
    cluster.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if FLAGS.keep_freed_memory and jax.default_backend() == "cpu":
        host_memory.keep_freed_memory()
    if FLAGS.config.task not in RUNS:
        raise app.UsageError(f"config.task={FLAGS.config.task!r} is not one of {sorted(RUNS)}")
    run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
