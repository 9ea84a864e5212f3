"""End-to-end fine-tuning (FAIR MAE's `main_finetune.py` recipe), trained by `train.fit`.

Classifier: the pretrained encoder, mean-pooled patch tokens -> LayerNorm -> Dense (or the
cls token after the final norm, `config.head.pool="cls"`). AdamW (lr base_lr x batch / 256,
beta (0.9, 0.999), weight decay except on 1-D parameters, biases,
pos_embed and cls_token: FAIR's `param_groups_lrd`) with layer-wise lr decay (llrd.py), warmup
+ cosine; drop-path on the MSSA residual of each encoder layer; mixup / cutmix and label
smoothing on device in the step, one draw per step from fold_in(seed, step) (mixup.py).

    python -m crate_jax.main --config=configs/finetune.py:dataset=cifar10 --config.init_from=DIR --workdir=OUT

The host-side augmentations of FAIR's recipe (RandomResizedCrop + flip + RandAugment +
random erasing) are the input pipeline's `finetune_train` transform (crate_jax/data/augment.py),
set by config.data.transform, config.data.randaugment and config.data.random_erasing.
"""

from __future__ import annotations

import optax

from crate_jax import optim
from crate_jax.evaluation import classify, llrd


def make_optimizer(config, schedule: optax.Schedule, params, depth: int) -> optax.GradientTransformation:
    """AdamW whose whole update (Adam step and decoupled weight decay) is scaled per
    parameter by decay^(depth + 1 - layer id)."""
    oc = config.optim
    if oc.name != "adamw":
        raise ValueError(f"config.optim.name={oc.name!r}: fine-tuning supports 'adamw'")
    if not 0.0 < oc.layer_decay <= 1.0:
        raise ValueError(f"config.optim.layer_decay={oc.layer_decay} must be in (0, 1]")
    tx = optax.chain(
        optax.scale_by_adam(b1=oc.b1, b2=oc.b2, eps=oc.eps),
        optax.add_decayed_weights(oc.weight_decay, mask=optim.decay_mask(params, optim.FINETUNE_NO_DECAY)),
        llrd.scale_by_multipliers(llrd.lr_multipliers(params, depth, oc.layer_decay)),
        optax.scale_by_learning_rate(schedule),
    )
    if oc.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(oc.grad_clip_norm), tx)
    return tx


def make_task(config):
    schedule = optim.learning_rate(config.optim, config.batch_size, config.total_steps)
    aug = config.augment
    for key in ("mixup", "cutmix", "label_smoothing"):
        if aug[key] < 0:
            raise ValueError(f"config.augment.{key}={aug[key]} must be >= 0")
    for key in ("mix_prob", "switch_prob"):
        if not 0.0 <= aug[key] <= 1.0:
            raise ValueError(f"config.augment.{key}={aug[key]} must be in [0, 1]")
    return classify.make_task(
        config,
        head="finetune",
        make_optimizer=lambda model, params: make_optimizer(config, schedule, params, model.depth),
        schedule=schedule,
        augment=True,
        drop_path_rate=config.drop_path_rate,
    )
