"""Every task's evaluation on one mesh, for tests/test_eval_meshes.py (run in a subprocess with
its own device count, and once per process for a multi-process run):

    python tests/eval_on_mesh.py OUT DATA_DIR DATA,FSDP,TENSOR [COORDINATOR NUM_PROCESSES PROCESS_ID]

Pretrains a tiny CRATE-MAE for 3 steps (a profiler trace of the second) and evaluates it
(eval loss, reconstructions, coding rate, sparsity, k-NN accuracy, completion PSNR), then trains a linear probe
(protocol "fair") and a fine-tune of it for one step each and evaluates them. Metrics go to
OUT/{pretrain,linear_probe,finetune}.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def configure(config, data_dir: str, mesh: tuple[int, int, int], **values):
    config.unlock()
    config.data.data_dir = data_dir
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
    config.update(log_every_steps=2, eval_steps=2, eval_batch_size=16, hang_timeout_s=600.0, **values)
    config.optim.warmup_steps = 0
    config.lock()
    return config


def main(out: str, data_dir: str, mesh: str, *distributed: str) -> None:
    from crate_jax import cluster
    from crate_jax.config_file import load_config

    if distributed:
        cluster.initialize(distributed[0], int(distributed[1]), int(distributed[2]))
    from crate_jax import main as entry

    shape = tuple(int(x) for x in mesh.split(","))
    pretrain = load_config(f"{ROOT}/configs/imagenet_mae.py:runlocal")
    pretrain.unlock()
    pretrain.data.name, pretrain.data.eval_split = "crate_jax_embedded", "probe_test"
    pretrain.knn_split, pretrain.knn_eval_split = "probe_train", "probe_test"
    pretrain.completion_split, pretrain.completion_images = "completion", 8  # the model gathered per host
    pretrain.profile_steps = 1  # the second of its 3 steps
    steps = 3
    pretrain = configure(pretrain, data_dir, shape, batch_size=16, total_steps=steps, eval_every_steps=steps,
                         checkpoint_every_steps=steps)  # fmt: skip
    entry.run(pretrain, f"{out}/pretrain")
    for task in ("linear_probe", "finetune"):
        config = load_config(f"{ROOT}/configs/{task}.py:dataset=embedded,runlocal")
        config.unlock()
        config.init_from = f"{out}/pretrain"
        config = configure(config, data_dir, shape, batch_size=16, total_steps=1, eval_every_steps=1,
                           checkpoint_every_steps=1)  # fmt: skip
        entry.run(config, f"{out}/{task}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(*sys.argv[1:])
