"""Weight-update sharding: where the optimizer's moments live and its update runs.

The end-to-end runs on 2x2x2, 4 and 2x2 devices in test_train.py (data axes of 2 and 4, so the
update is split there) check that the losses and a resume onto another mesh equal the
one-device run; here the layout itself, on abstract meshes, and the state it gives."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import ml_collections
import optax
import pytest
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

from crate_jax import models, optim, sharding, step


def _mesh(data=8, fsdp=1, tensor=2):
    # Auto axes, as `sharding.make_mesh`'s Mesh has (AbstractMesh's default became Explicit after jax 0.11.0).
    return AbstractMesh((1, data, fsdp, tensor), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)


def _shardings(mesh, shapes_and_specs, axes=("data",)):
    params = {k: jax.ShapeDtypeStruct(shape, jnp.float32) for k, (shape, _) in shapes_and_specs.items()}
    param_shardings = {k: NamedSharding(mesh, spec) for k, (_, spec) in shapes_and_specs.items()}
    return sharding.update_shardings(params, param_shardings, mesh, axes)


def test_the_split_dimension_is_the_one_whose_tiled_slices_are_smallest():
    mesh = _mesh()
    out = _shardings(
        mesh,
        {
            "kernel": ((64, 256), P(None, "tensor")),  # (8, 128) slices, not (64, 16) padded to (64, 128)
            "wide": ((16, 64), P()),  # a major dimension before the lane dimension
            "lanes": ((3, 64), P()),  # only the lane dimension divides
            "bias": ((256,), P("tensor")),  # split further along the same dimension
            "odd": ((3, 5), P()),  # nothing 8 divides: as the parameter
            "token": ((1, 1, 64), P()),
        },
    )
    assert out["kernel"].spec == P("data", "tensor")
    assert out["wide"].spec == P("data", None)
    assert out["lanes"].spec == P(None, "data")
    assert out["bias"].spec == P(("tensor", "data"))
    assert out["odd"].spec == P()
    assert out["token"].spec == P(None, None, "data")


def test_axes_of_size_one_or_already_used_are_ignored():
    mesh = _mesh(data=1, fsdp=4, tensor=1)
    out = _shardings(mesh, {"k": ((64, 32), P("fsdp", None))}, axes=("data",))
    assert out["k"].spec == P("fsdp", None)  # data has size 1: nothing to split
    out = _shardings(mesh, {"k": ((64, 32), P("fsdp", None))}, axes=("fsdp",))
    assert out["k"].spec == P("fsdp", None)  # fsdp already splits the parameter
    out = _shardings(_mesh(data=2, fsdp=2, tensor=1), {"k": ((64, 32), P())}, axes=("data", "fsdp"))
    assert out["k"].spec == P(("data", "fsdp"), None)


def test_config_key_is_checked():
    config = ml_collections.ConfigDict({"mesh": {"update_sharding": ("data", "model")}})
    with pytest.raises(ValueError, match=r"config.mesh.update_sharding: unknown mesh axis 'model'"):
        sharding.update_axes(config)
    assert sharding.update_axes(ml_collections.ConfigDict({"mesh": {"update_sharding": ()}})) == ()


needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason='needs libtpu (the "tpu" extra) for an 8-chip abstract mesh'
)


def _topology_mesh(data, tensor):
    """A concrete mesh over the abstract devices of a v5e-8 (this host has one CPU device)."""
    from crate_jax.tools import aot_compile, topologies

    del aot_compile  # imported for the environment it sets for libtpu

    config = ml_collections.ConfigDict(dict(slices=1, data=data, fsdp=1, tensor=tensor))
    return sharding.make_mesh(config, topologies.parse("v5e-8").devices())


def _abstract_state(mesh, update_axes):
    model = models.build("crate_mae_tiny", image_size=32, patch_size=4, width=64, num_heads=4, depth=2)
    opt = ml_collections.ConfigDict(
        dict(name="adamw", b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05, no_decay=(), grad_clip_norm=1.0)
    )
    rules = (("act_batch", ("slices", "data", "fsdp")), ("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"))
    schedule = optax.constant_schedule(1e-3)
    return step.abstract_state(model, lambda p: optim.make_optimizer(opt, schedule, p), mesh, rules, update_axes)


@needs_libtpu
def test_moments_follow_the_update_sharding_and_params_keep_theirs():
    mesh = _topology_mesh(data=4, tensor=2)
    abstract, plain, _ = _abstract_state(mesh, ())
    abstract, split, _ = _abstract_state(mesh, ("data",))
    assert split.params == plain.params  # the parameters' own layout is unchanged
    adam = split.opt_state[1][0]  # chain(clip, adamw): adamw's ScaleByAdamState
    mu_dict = adam.mu["encoder"]["layer_0"]["ista"]["D"]  # (embed, mlp): (fsdp, tensor)
    assert mu_dict.spec == P(("fsdp", "data"), "tensor")  # fsdp has size 1
    # Every moment leaf is split over data, or keeps its parameter's sharding (nothing divides).
    for moment, param, shard in zip(
        jax.tree.leaves(adam.nu), jax.tree.leaves(abstract.params), jax.tree.leaves(split.params), strict=True
    ):
        entries = jax.tree.leaves(tuple(moment.spec))
        assert "data" in entries or (moment == shard and all(d % 4 for d in param.shape))


@needs_libtpu
def test_update_sharding_off_gives_the_parameter_shardings():
    mesh = _topology_mesh(data=8, tensor=1)
    abstract, plain, _ = _abstract_state(mesh, ())
    adam = plain.opt_state[1][0]
    assert jax.tree.leaves(adam.mu) == jax.tree.leaves(plain.params)
