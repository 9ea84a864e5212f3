"""Model zoo: CRATE-MAE (encoder, decoder, masking) and FAIR's ViT-MAE baseline.

model = crate_jax.models.build("crate_mae_base", image_size=224)
params = model.init(jax.random.key(0), images)["params"]
out = model.apply({"params": params}, images, rngs={"mask": key})
"""

from crate_jax.models.mae import CrateMAE, MAEOutput, ViTMAE, attention_calls, random_masking, reconstruction_loss
from crate_jax.models.presets import PRESETS, abstract_params, build, count_params, model_fields
from crate_jax.models.stack import to_layout

__all__ = [
    "PRESETS",
    "CrateMAE",
    "MAEOutput",
    "ViTMAE",
    "abstract_params",
    "attention_calls",
    "build",
    "count_params",
    "model_fields",
    "random_masking",
    "reconstruction_loss",
    "to_layout",
]
