"""The device mesh, logical-axis rules and global arrays.

Mesh axes are ("slices", "data", "fsdp", "tensor"): `slices` is data parallelism across
TPU slices over DCN, the others live inside a slice. The model names its axes logically
(crate_jax/models/layers.py); `config.axis_rules` maps them onto these mesh axes.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("slices", "data", "fsdp", "tensor")
BATCH_AXES = ("slices", "data", "fsdp")  # every axis the global batch is split over


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
    """(slices, data, fsdp, tensor) with one -1 among data/fsdp/tensor filled in."""
    sizes = {"slices": int(mesh_config.slices)} | {a: int(getattr(mesh_config, a)) for a in ("data", "fsdp", "tensor")}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1 or sizes["slices"] == -1:
        raise ValueError(f"config.mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"config.mesh sizes must be positive (or -1), got {sizes}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"config.mesh {sizes}: {num_devices} devices are not divisible by {fixed}")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"config.mesh {sizes} has {math.prod(sizes.values())} devices, but there are {num_devices}")
    return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(mesh_config, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_config, len(devices))
    if shape[0] > 1:  # several slices: the slices axis runs over DCN
        grid = mesh_utils.create_hybrid_device_mesh((1, *shape[1:]), (shape[0], 1, 1, 1), devices=devices)
    else:
        try:
            grid = mesh_utils.create_device_mesh(shape, devices=devices)
        except (ValueError, NotImplementedError, AssertionError):
            grid = np.asarray(devices).reshape(shape)  # e.g. abstract or odd topologies
    return Mesh(grid, MESH_AXES)


def axis_rules(config) -> tuple[tuple[str, Any], ...]:
    """config.axis_rules as flax wants them: ((logical, mesh axis or axes or None), ...)."""
    rules = []
    for logical, mesh_axes in config.axis_rules:
        if isinstance(mesh_axes, list):
            mesh_axes = tuple(mesh_axes)
        for axis in mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,):
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(f"config.axis_rules: {logical!r} maps to unknown mesh axis {axis!r}; use {MESH_AXES}")
        rules.append((logical, mesh_axes))
    return tuple(rules)


def update_axes(config) -> tuple[str, ...]:
    """config.mesh.update_sharding: the mesh axes the optimizer update is split over."""
    axes = config.mesh.update_sharding
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    for axis in axes:
        if axis not in MESH_AXES:
            raise ValueError(f"config.mesh.update_sharding: unknown mesh axis {axis!r}; use some of {MESH_AXES}")
    return axes


def logical_shardings(boxed_tree, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree of flax LogicallyPartitioned boxes (e.g. abstract params)."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from each process's contiguous rows of the global batch."""
    sharding = batch_sharding(mesh)
    out = {}
    for key, value in local.items():
        shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
        out[key] = jax.make_array_from_process_local_data(sharding, value, shape)
    return out


# TPUs lay an array's two minor dimensions out in (8, 128) tiles: a slice of 3 x 768 takes the
# space of 8 x 768, one of 768 x 3 that of 768 x 128.
_TILE = (1,) * 6 + (8, 128)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def update_shardings(abstract_params, param_shardings, mesh: Mesh, axes) -> Any:
    """Where the optimizer's moments live and its update runs: each parameter's sharding, further
    split over the mesh axes `axes` (e.g. ("data",)) along a dimension their size divides: the
    one whose slices take the least memory once tiled as on TPUs (`_TILE`), so a major
    dimension rather than the lane dimension where both divide.

    Weight-update sharding (Xu et al. 2020, "Automatic Cross-Replica Sharding of Weight Update in
    Data-Parallel Training"): with parameters replicated over the data axis, every replica would
    run the same AdamW update over every fp32 parameter and hold both moments whole. Split, each
    replica updates its slice, with 1/|data| of the update's HBM traffic and moment memory, and
    the new parameters are gathered. (Ideally the gradient's all-reduce becomes a reduce-scatter,
    for the same interconnect bytes; in the TPU compiles measured here XLA kept the all-reduce
    and added the gather: README, "TPU: where the HBM bytes go".) A parameter none of whose
    dimensions the axes divide keeps its own sharding. Axes of size one, or absent from the
    mesh, are ignored."""
    axes = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)

    def entry_axes(entry) -> tuple[str, ...]:
        return () if entry is None else entry if isinstance(entry, tuple) else (entry,)

    def one(leaf, param_sharding: NamedSharding) -> NamedSharding:
        spec = [entry_axes(e) for e in param_sharding.spec] + [()] * (leaf.ndim - len(param_sharding.spec))
        free = tuple(a for a in axes if all(a not in e for e in spec))
        shards = math.prod(mesh.shape[a] for a in free)
        split = [math.prod(mesh.shape[a] for a in e) for e in spec]  # shards per dimension now
        dims = [i for i in range(leaf.ndim) if leaf.shape[i] % (split[i] * shards) == 0]
        if not free or not dims:
            return param_sharding
        local = [n // k for n, k in zip(leaf.shape, split, strict=True)]

        def tiled(i):  # elements of the slice split along dimension i, as TPUs tile it in HBM
            shape = [n // shards if j == i else n for j, n in enumerate(local)]
            return math.prod(_round_up(n, t) for n, t in zip(shape, _TILE[-len(shape) :], strict=True))

        dim = min(dims, key=tiled)  # the first of the smallest
        spec[dim] = spec[dim] + free
        return NamedSharding(mesh, P(*(None if not e else e[0] if len(e) == 1 else e for e in spec)))

    return jax.tree.map(one, abstract_params, param_shardings)


def sharded_updates(tx: optax.GradientTransformation, shardings) -> optax.GradientTransformation:
    """`tx` with the gradients and parameters it reads and the updates it returns constrained to
    `shardings` (`update_shardings`). `optax.apply_updates` then adds each update
    to its slice of the parameter, and the jitted step's output sharding gathers the result."""

    def constrain(tree):
        return jax.tree.map(jax.lax.with_sharding_constraint, tree, shardings)

    def update(grads, state, params=None):
        updates, state = tx.update(constrain(grads), state, None if params is None else constrain(params))
        return constrain(updates), state

    # init stays the inner one: the state's shardings are the jitted init's out_shardings.
    return optax.GradientTransformation(tx.init, update)


def check_sharded(params, shardings, min_size: int = 2**16) -> list[str]:
    """Names of large parameters that the rules left fully replicated (a config smell when the
    mesh has fsdp/tensor axes larger than one)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    shard_flat = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    replicated_names = []
    for (path, leaf), sharding in zip(flat, shard_flat, strict=True):
        if leaf.size >= min_size and all(axis is None for axis in sharding.spec):
            replicated_names.append(jax.tree_util.keystr(path))
    return replicated_names
