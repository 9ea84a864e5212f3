"""Entry point: `python -m crate_jax.main --config=configs/imagenet_mae.py --workdir=DIR`."""

import logging
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from crate_jax import host_memory, train
from crate_jax.evaluation import knn, linear_probe

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and images go here (local or gs://).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs JAX cannot detect.")
flags.DEFINE_integer("num_processes", None, "Number of processes, with --coordinator_address.")
flags.DEFINE_integer("process_id", None, "This process's index, with --coordinator_address.")
flags.DEFINE_bool(
    "keep_freed_memory",
    True,
    "On a CPU backend, keep freed memory in the process (glibc): XLA:CPU frees a step's temporaries "
    "and would page-fault them in again every step (crate_jax/host_memory.py).",
)
flags.mark_flags_as_required(["config", "workdir"])

TASKS = {
    "pretrain": train.train_and_evaluate,
    "finetune": train.train_and_evaluate,
    "linear_probe": linear_probe.run,  # protocol "fair" through train_and_evaluate, or "logistic"
    "knn": knn.run,
}


def initialize_distributed() -> None:
    if FLAGS.coordinator_address:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()  # SLURM and multi-host TPU slices are detected by JAX


class _QuietLibraries(logging.Filter):
    """Orbax logs every file it writes at INFO through absl; keep its warnings only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    logging.getLogger("absl").addFilter(_QuietLibraries())
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    initialize_distributed()
    if FLAGS.keep_freed_memory and jax.default_backend() == "cpu":
        host_memory.keep_freed_memory()
    logging.info("process %d/%d, %d devices", jax.process_index(), jax.process_count(), jax.device_count())
    task = FLAGS.config.task
    if task not in TASKS:
        raise app.UsageError(f"config.task={task!r} is not one of {sorted(TASKS)}")
    TASKS[task](FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
