"""Accelerator names -> `jax.experimental.topologies.get_topology_desc` arguments: Cloud TPU
slices, and NVIDIA GPUs compiled for without one.

Names are the ones `gcloud compute tpus tpu-vm create --accelerator-type` takes: `v4-128`,
`v5p-128`, `v5e-256` (or `v5litepod-256`), `v6e-256`. The number after the dash counts
TensorCores for v4 and v5p (two per chip, seen by JAX as one "megacore" device) and chips
for v5e and v6e. An explicit libtpu topology (`v4:4x4x12`, `v5e:8x16`) is accepted too.

Chip figures (Cloud TPU system-architecture pages): HBM per chip, the dense bf16 peak and the
HBM bandwidth per chip (v4 1,228 GB/s, v5p 2,765 GB/s, v5e 819 GB/s, v6e 1,640 GB/s).

GPUs: `h100`, `h200` (one GPU) or `h200-8` (GPUs on one host; 16, 24, ... for hosts of 8).
XLA compiles for them without a GPU from a device description (`GpuTopology.target_config`,
XLA's GpuTargetConfig text format), through JAX's CUDA plugin (the `gpu` extra) with no GPU
opened. Autotuning needs a device, so GEMM configurations are XLA's defaults, not the tuned
ones: the fusions and buffers are the GPU program's, its kernel choices may differ. Figures
(NVIDIA data sheets, SXM parts): dense bf16 989 TFLOP/s, 132 SMs; HBM 80 GB at 3.35 TB/s
(H100), 141 GB at 4.8 TB/s (H200).
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
    platform = "tpu"

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


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str  # as --topology takes it: h100, h200
    device_kind: str  # what JAX reports as device_kind
    hbm_bytes: int  # what the driver reports (nvidia-smi)
    peak_bf16_flops: float
    hbm_bytes_per_s: float
    sm_count: int = 132
    l2_bytes: int = 50 * 1024**2
    clock_ghz: float = 1.98


GPUS = {
    "h100": Gpu("h100", "NVIDIA H100 80GB HBM3", 81559 * 1024**2, 989e12, 3.35e12),
    "h200": Gpu("h200", "NVIDIA H200", 143771 * 1024**2, 989e12, 4.8e12),
}
GPUS_PER_HOST = 8


@dataclasses.dataclass(frozen=True)
class GpuTopology:
    """GPUs of one kind, `GPUS_PER_HOST` per host (fewer: one host), compiled for deviceless."""

    accelerator_type: str
    chip: Gpu
    gpus: int
    num_slices: int = 1
    platform = "gpu"

    @property
    def chips(self) -> int:
        return self.gpus

    @property
    def hosts(self) -> int:
        return max(self.gpus // GPUS_PER_HOST, 1)

    @property
    def topology_name(self) -> str:  # slices x hosts x devices per host, as XLA's GPU topology reads it
        return f"1x{self.hosts}x{self.gpus // self.hosts}"

    def target_config(self) -> str:
        g = self.chip
        return (
            "gpu_device_info { threads_per_block_limit: 1024 threads_per_warp: 32 "
            "shared_memory_per_block: 49152 shared_memory_per_core: 233472 threads_per_core_limit: 2048 "
            f"core_count: {g.sm_count} fpus_per_core: 128 block_dim_limit_x: 2147483647 "
            "block_dim_limit_y: 65535 block_dim_limit_z: 65535 "
            f"memory_bandwidth: {int(g.hbm_bytes_per_s)} l2_cache_size: {g.l2_bytes} clock_rate_ghz: {g.clock_ghz} "
            f"device_memory_size: {g.hbm_bytes} shared_memory_per_block_optin: 232448 "
            "cuda_compute_capability { major: 9 minor: 0 } registers_per_core_limit: 65536 "
            "registers_per_block_limit: 65536 } "
            'platform_name: "CUDA" dnn_version_info { major: 9 minor: 10 } '
            "runtime_version { major: 12 minor: 8 } "
            f'device_description_str: "{g.device_kind}"'
        )

    def devices(self) -> list:
        """Compile-only devices (JAX's CUDA plugin; no GPU is opened)."""
        from jax.experimental import topologies

        try:
            desc = topologies.get_topology_desc(
                platform="cuda", target_config=self.target_config(), topology=self.topology_name
            )
        except NotImplementedError as e:  # "topology not implemented for cuda": no CUDA plugin
            raise RuntimeError(
                f"--topology={self.accelerator_type} needs JAX's CUDA plugin to compile for a GPU without one: "
                "pip install -e '.[gpu]'"
            ) from e
        return list(desc.devices)


def parse_gpu(name: str) -> GpuTopology | None:
    """`h200`, `h200-8`, `h100-16`; None if `name` names no GPU."""
    m = re.fullmatch(r"([a-z]\d+)(?:-(\d+))?", name)
    if not m or m.group(1) not in GPUS:
        return None
    gpus = int(m.group(2) or 1)
    if gpus < 1 or (gpus > GPUS_PER_HOST and gpus % GPUS_PER_HOST):
        raise ValueError(f"{name}: up to {GPUS_PER_HOST} GPUs on one host, or whole hosts of {GPUS_PER_HOST}")
    return GpuTopology(f"{m.group(1)}-{gpus}", GPUS[m.group(1)], gpus)


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


def parse(name: str, num_slices: int = 1) -> Topology | GpuTopology:
    """`v5e-256`, `v5litepod-256`, `v4-128`, `v5p-128`, `v6e-256`, `v5e:16x16`; or a GPU: `h200-8`."""
    if num_slices < 1:
        raise ValueError(f"num_slices={num_slices} must be >= 1")
    if (gpu := parse_gpu(name)) is not None:
        if num_slices != 1:
            raise ValueError(f"--num_slices={num_slices}: GPU topologies are hosts of {GPUS_PER_HOST} (h200-16)")
        return gpu
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
