r"""The embedded default: a small CRATE-MAE pretrained on photographs shipped with
scikit-image / scikit-learn / matplotlib (built into a TFDS dataset on first use).

    python -m crate_jax.main --config=configs/demo.py --workdir=/tmp/crate_demo

Expected cost on 2 CPU cores: about 3 minutes (600 steps of batch 32 at 32x32 px, patch 4,
width 128, 4+4 layers). The loss falls from about 1.0 to about 0.4 and
WORKDIR/reconstructions/step_*.png shows original | masked | reconstruction |
reconstruction with the visible patches pasted back.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "imagenet_mae", os.path.join(os.path.dirname(__file__), "imagenet_mae.py")
)
imagenet_mae = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(imagenet_mae)


def get_config(arg: str | None = None):
    config = imagenet_mae.get_config("variant=tiny,runlocal" + (f",{arg}" if arg else ""))
    config.batch_size = 32
    config.total_steps = 600
    config.log_every_steps = 20
    config.eval_every_steps = 200
    config.eval_steps = 4
    config.eval_batch_size = 64
    config.num_reconstructions = 8
    config.checkpoint_every_steps = 200
    config.optim.base_lr = 1.5e-3  # x 32/256: a short run wants a larger step than ImageNet's
    config.optim.warmup_steps = 30
    config.optim.weight_decay = 0.05
    config.model.width = 128
    config.model.depth = 4
    config.model.decoder_depth = 4
    config.model.num_heads = 4
    config.model.decoder_num_heads = 4
    config.data.name = "crate_jax_embedded"
    config.data.split = "train"
    config.data.eval_split = "probe_test"
    config.knn_split = "probe_train"  # crops labelled by source photo (16 classes)
    config.knn_eval_split = "probe_test"
    config.completion_split = "completion"  # crops of photographs no training split uses
    return config
