"""The train step in process: gradient accumulation, masking noise, weight decay mask."""

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from crate_jax import models, optim, sharding, step
from crate_jax.config_file import load_config
from crate_jax.train import validate

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(image_size=32, patch_size=4, width=64, num_heads=4, depth=2)


def _setup(batch_size, grad_accum_steps):
    import ml_collections

    model = models.build("crate_mae_tiny", **TINY)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(slices=1, data=-1, fsdp=1, tensor=1)))
    rules = (("act_batch", ("slices", "data", "fsdp")),)
    schedule = optax.constant_schedule(1e-3)
    opt_config = ml_collections.ConfigDict(
        dict(name="adamw", b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05, no_decay=(), grad_clip_norm=1.0)
    )
    _, shardings, tx = step.abstract_state(model, lambda p: optim.make_optimizer(opt_config, schedule, p), mesh, rules)
    state = step.init_state(model, tx, 0, shardings, mesh, rules)
    fn = step.make_train_step(model, tx, schedule, seed=0, batch_size=batch_size, grad_accum_steps=grad_accum_steps)

    def run(state, batch):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jax.jit(fn)(state, batch)

    return run, state


def test_gradient_accumulation_equals_one_large_batch():
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.normal(size=(16, 32, 32, 3)), jnp.float32),
        "label": jnp.zeros(16, jnp.int32),
        "weight": jnp.asarray([1.0] * 15 + [0.0]),  # a placeholder example too
    }
    one, state1 = _setup(16, 1)
    four, state4 = _setup(16, 4)
    s1, m1 = one(state1, batch)
    s4, m4 = four(state4, batch)
    assert abs(float(m1["loss"]) - float(m4["loss"])) <= 1e-5 * abs(float(m1["loss"]))
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params), strict=True):
        err = float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(a), 1e-12))
        assert err <= 1e-5
    assert int(m1["skipped_examples"]) == 1


def test_masking_noise_depends_on_seed_step_and_index_only():
    a = step.masking_noise(0, step.MASK_STREAM, jnp.int32(3), 8, 64)
    b = step.masking_noise(0, step.MASK_STREAM, jnp.int32(3), 16, 64)
    np.testing.assert_array_equal(a, b[:8])  # example i's noise does not depend on the batch size
    c = step.masking_noise(0, step.MASK_STREAM, jnp.int32(4), 8, 64)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("scan", [True, False])
def test_weight_decay_mask_is_fairs_pretraining_rule(scan):
    # timm's add_weight_decay: no decay for 1-D parameters and biases only; the (1, 1, d) tokens ARE decayed.
    model = models.build("crate_mae_tiny", scan_layers=scan, **TINY)
    params = models.abstract_params(model)
    mask = optim.decay_mask(params)
    layer = mask["encoder"]["layers"] if scan else mask["encoder"]["layer_0"]
    assert layer["ista"]["D"] and layer["mssa"]["qkv"]["kernel"] and mask["patch_embed"]["proj"]["kernel"]
    assert not layer["norm1"]["scale"] and not layer["mssa"]["to_out"]["bias"] and not mask["norm"]["bias"]
    assert mask["cls_token"] and mask["mask_token"]
    exempt = optim.decay_mask(params, optim.check_no_decay(params, ("cls_token", "mask_token")))
    assert not exempt["cls_token"] and not exempt["mask_token"] and exempt["decoder_pred"]["kernel"]


def test_no_decay_names_are_checked():
    params = models.abstract_params(models.build("crate_mae_tiny", **TINY))
    with pytest.raises(ValueError, match=r"config.optim.no_decay: 'cls_tokens' is not a parameter name"):
        optim.check_no_decay(params, ("cls_tokens",))
    with pytest.raises(ValueError, match=r"config.optim.no_decay='cls_token' must be a tuple"):
        optim.check_no_decay(params, "cls_token")
    config = load_config(str(ROOT / "configs" / "demo.py"))
    assert tuple(config.optim.no_decay) == ()
    config.optim.no_decay = ("mask_token", "typo")
    with pytest.raises(ValueError, match="'typo' is not a parameter name"):
        optim.make_optimizer(config.optim, optax.constant_schedule(1e-3), params)


def test_validate_names_the_key():
    config = load_config(str(ROOT / "configs" / "imagenet_mae.py") + ":runlocal")
    config.batch_size = 12
    with pytest.raises(ValueError, match=r"config.batch_size=12 is not divisible by the 8 batch-sharding devices"):
        validate(config, 8)
    config.batch_size = 16
    config.mesh.data = 3
    with pytest.raises(ValueError, match="config.mesh"):
        validate(config, 8)
