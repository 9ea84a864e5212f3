r"""The embedded default: a small CRATE-MAE pretrained on photographs shipped with
scikit-image / scikit-learn / matplotlib (built into a TFDS dataset on first use).

    python -m crate_jax.main --config=configs/demo.py --workdir=/tmp/crate_demo

3,000 steps of batch 32 at the dataset's own 64 px, patch 16 (a 4x4 grid, as ViT-B/16 at
64 px), 75% of the patches hidden, the loss on every patch (the paper's whole-image loss),
width 128, 2+2 layers, each training crop recoloured and turned (`mae_pretrain_recolour`: 16
photographs are few enough to memorise). Expected cost on 2 CPU cores: see the README's quick start (measured
there with the load it ran under). WORKDIR/reconstructions/step_*.png shows original | masked |
reconstruction | reconstruction with the visible patches pasted back; every eval logs
`completion_psnr` on photographs no training split uses, beside mean-colour fill and biharmonic
inpainting on the same masks (README, "Masked completion"). The recipe was chosen by measuring
completion PSNR against steps: at 32 px with patch 4 or 8, or with 4+4 layers, the model stayed
at or below both baselines within the budget (README).
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
    config.total_steps = 3000  # completion PSNR still rising at 3,000 (README); the budget is 5 minutes
    config.log_every_steps = 100
    config.eval_every_steps = 1000
    config.eval_steps = 4
    config.eval_batch_size = 64
    config.num_reconstructions = 8
    config.checkpoint_every_steps = 1000
    config.optim.base_lr = 1e-2  # x 32/256 = 1.25e-3 at the peak: a short run wants a larger step than ImageNet's
    config.optim.warmup_steps = 30
    config.optim.weight_decay = 0.05
    config.optim.no_decay = ()  # leaf names exempt from decay besides 1-D parameters and biases
    config.model.image_size = 64  # the embedded crops' own size
    config.model.patch_size = 16  # 17 tokens: 2,000 steps fit the budget (patch 4 at 32 px: 600)
    config.model.loss_patches = "all"  # the paper's whole-image loss: it completed better here (README)
    config.model.width = 128
    config.model.depth = 2  # 4+4 layers completed unseen photographs worse at equal time (README)
    config.model.decoder_depth = 2
    config.model.num_heads = 4
    config.model.decoder_num_heads = 4
    config.data.name = "crate_jax_embedded"
    config.data.split = "train"
    config.data.transform = "mae_pretrain_recolour"  # colours and orientation read from the visible patches
    config.data.eval_split = "probe_test"
    config.knn_split = "probe_train"  # crops labelled by source photo (16 classes)
    config.knn_eval_split = "probe_test"
    config.completion_split = "completion"  # crops of photographs no training split uses
    return config
