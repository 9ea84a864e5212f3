"""Cloud TPU accelerator types -> `jax.experimental.topologies.get_topology_desc` arguments.

Names are the ones `gcloud compute tpus tpu-vm create --accelerator-type` takes: `v4-128`,
`v5p-128`, `v5e-256` (or `v5litepod-256`), `v6e-256`. The number after the dash counts
TensorCores for v4 and v5p (two per chip, seen by JAX as one "megacore" device) and chips
for v5e and v6e. An explicit libtpu topology (`v4:4x4x12`, `v5e:8x16`) is accepted too.

Chip figures (Cloud TPU system-architecture pages): HBM per chip, the dense bf16 peak and the
HBM bandwidth per chip (v4 1,228 GB/s, v5p 2,765 GB/s, v5e 819 GB/s, v6e 1,640 GB/s).
"""

from __future__ import annotations

import dataclasses
import math
import re

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    generation: str  # as in accelerator types: v4, v5p, v5e, v6e
    libtpu_name: str  # the prefix libtpu's topology names use
    hbm_bytes: int
    peak_bf16_flops: float
    cores_per_chip_in_name: int  # v4-128 / v5p-128 count TensorCores: 64 chips
    dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
    chip_config_name: str  # "megacore": one JAX device per chip
    hbm_bytes_per_s: float = 0.0  # published HBM bandwidth per chip


CHIPS = {
    "v4": Chip("v4", "v4", 32 * GIB, 275e12, 2, 3, "megacore", 1228e9),
    "v5p": Chip("v5p", "v5", 95 * GIB, 459e12, 2, 3, "megacore", 2765e9),
    "v5e": Chip("v5e", "v5e", 16 * GIB, 197e12, 1, 2, "default", 819e9),
    "v6e": Chip("v6e", "v6e", 32 * GIB, 918e12, 1, 2, "default", 1640e9),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}

_SMALL_3D = {1: (1, 1, 1), 2: (1, 2, 1), 4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}
_SMALL_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4)}


@dataclasses.dataclass(frozen=True)
class Topology:
    accelerator_type: str  # the Cloud TPU name, e.g. v5litepod-256 -> v5e-256
    chip: Chip
    shape: tuple[int, ...]  # chips along each torus axis
    num_slices: int = 1

    @property
    def topology_name(self) -> str:
        return f"{self.chip.libtpu_name}:{'x'.join(map(str, self.shape))}"

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        """Four chips per host (2x2x1) on every multi-host slice; smaller slices are one host."""
        shape3 = (*self.shape, 1, 1)[:3]
        if self.chips_per_slice <= 4 or (self.chip.dims == 2 and self.chips_per_slice == 8):
            return shape3  # one host holds the whole slice (v5litepod-8 / v6e-8 included)
        return (2, 2, 1)

    @property
    def hosts(self) -> int:
        return self.chips // math.prod(self.chips_per_host_bounds)

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        """Wraparound links: v4/v5p slices of full 4-chip cubes are tori; v5e/v6e wrap a 16-chip axis."""
        if self.chip.dims == 3:
            return (min(self.shape) >= 4,) * 3
        return (self.shape[0] == 16, self.shape[1] == 16, False)

    def get_topology_desc_kwargs(self) -> dict:
        return dict(
            topology_name=self.topology_name,
            platform="tpu",
            chip_config_name=self.chip.chip_config_name,
            chips_per_host_bounds=self.chips_per_host_bounds,
            num_slices=self.num_slices,
            wrap=self.wrap,
        )

    def devices(self) -> list:
        """The compile-only devices of this topology (needs libtpu)."""
        from jax.experimental import topologies

        return list(topologies.get_topology_desc(**self.get_topology_desc_kwargs()).devices)


def _chip(generation: str) -> Chip:
    generation = ALIASES.get(generation, generation)
    if generation not in CHIPS:
        raise ValueError(f"unknown TPU generation {generation!r}; known: {sorted(CHIPS)} (and {sorted(ALIASES)})")
    return CHIPS[generation]


def default_shape(chip: Chip, chips: int) -> tuple[int, ...]:
    """The slice shape Cloud TPU gives an accelerator type of `chips` chips."""
    if chip.dims == 3:
        if chips in _SMALL_3D:
            return _SMALL_3D[chips]
        if chips % 64 or (chips // 64) & (chips // 64 - 1):
            raise ValueError(
                f"{chips} {chip.generation} chips: give the shape explicitly, e.g. {chip.libtpu_name}:4x4x12"
            )
        shape = [4, 4, 4]
        while math.prod(shape) < chips:  # 4x4x8, 4x8x8, 8x8x8, 8x8x16, ...
            shape[2 - shape[::-1].index(min(shape))] *= 2  # the last of the shortest axes
        return tuple(shape)
    if chips in _SMALL_2D:
        return _SMALL_2D[chips]
    side = math.isqrt(chips)
    if side * side == chips:
        return (side, side)
    if chips % 2 == 0 and math.isqrt(chips // 2) ** 2 == chips // 2:
        side = math.isqrt(chips // 2)
        return (side, 2 * side)
    raise ValueError(f"{chips} {chip.generation} chips is not a Cloud TPU slice size")


def parse(name: str, num_slices: int = 1) -> Topology:
    """`v5e-256`, `v5litepod-256`, `v4-128`, `v5p-128`, `v6e-256`, or `v5e:16x16`."""
    if num_slices < 1:
        raise ValueError(f"num_slices={num_slices} must be >= 1")
    if m := re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)+)", name):
        chip = _chip(m.group(1))
        shape = tuple(int(s) for s in m.group(2).split("x"))
        if len(shape) != chip.dims:
            raise ValueError(f"topology {name!r}: {chip.generation} slices have {chip.dims} axes")
        count = math.prod(shape) * chip.cores_per_chip_in_name
        return Topology(f"{chip.generation}-{count}", chip, shape, num_slices)
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name)
    if not m:
        raise ValueError(f"topology {name!r}: expected an accelerator type like v5e-256, v4-128, or v5e:16x16")
    chip = _chip(m.group(1))
    count = int(m.group(2))
    if count % chip.cores_per_chip_in_name:
        raise ValueError(f"{name}: {chip.generation} types count TensorCores, 2 per chip")
    chips = count // chip.cores_per_chip_in_name
    return Topology(f"{chip.generation}-{count}", chip, default_shape(chip, chips), num_slices)
