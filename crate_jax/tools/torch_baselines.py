"""PyTorch baselines of the released models for `tools.benchmark --torch`: one AdamW train step
at the benchmark's batch and resolution, on the same device (CUDA when JAX runs on a GPU).

  torch_eager    the released model files as written: attention as softmax(q kᵀ) v products
  torch_sdpa     the same modules with their attention forward replaced by
                 `F.scaled_dot_product_attention` (PyTorch picks flash / cuDNN / efficient)
  torch_compile  torch_sdpa under `torch.compile`

The models come from `--torch_module` (default `tests.torch_reference`, the PyTorch models
the parity tests check against); only their attention modules' `forward` is swapped, per
instance, for SDPA. On CUDA the step runs under bf16 autocast (the config's compute dtype)
with fused AdamW; on CPU in fp32 unless the config asks for bf16.
"""

from __future__ import annotations

import importlib
import os
import resource
import statistics
import time
import types
from typing import Any

TORCH_VARIANTS = ("torch_eager", "torch_sdpa", "torch_compile")


def _mssa_sdpa(self, x):
    """CRATE's MSSA (q = k = v = U x) through SDPA; same parameters and output."""
    import torch.nn.functional as F

    n_batch, n, _ = x.shape
    w = self.project(x)  # (N, K, n, p)
    out = F.scaled_dot_product_attention(w, w, w, scale=self.scale)
    return self.to_out(out.permute(0, 2, 1, 3).reshape(n_batch, n, self.heads * self.dim_head))


def _vit_sdpa(self, x):
    """timm's Attention through SDPA; same parameters and output."""
    import torch.nn.functional as F

    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale)
    return self.proj(out.transpose(1, 2).reshape(b, n, c))


def use_sdpa(ref, tmodel) -> int:
    """Swap every attention module's forward for its SDPA twin; returns how many."""
    swapped = 0
    for module in tmodel.modules():
        if isinstance(module, ref.MSSA):
            module.forward = types.MethodType(_mssa_sdpa, module)
            swapped += 1
        elif isinstance(module, ref.Attention):
            module.forward = types.MethodType(_vit_sdpa, module)
            swapped += 1
    return swapped


def build(ref, model):
    """The PyTorch model matching a built crate-jax model (a CrateMAE or ViTMAE)."""
    from crate_jax import models

    if isinstance(model, models.CrateMAE):
        if model.decoder_num_heads and model.decoder_num_heads != model.num_heads:
            raise ValueError("the PyTorch CrateMAE has one head count for encoder and decoder")
        return ref.CrateMAE(
            img_size=model.image_size,
            patch_size=model.patch_size,
            dim=model.width,
            depth=model.depth,
            heads=model.num_heads,
            decoder_depth=model.decoder_depth,
            ista_step=model.ista_step,
            ista_lambda=model.ista_lambda,
            norm_pix_loss=model.norm_pix_loss,
        )
    return ref.FairMAE(
        img_size=model.image_size,
        patch_size=model.patch_size,
        embed_dim=model.width,
        depth=model.depth,
        num_heads=model.num_heads,
        decoder_embed_dim=model.decoder_width,
        decoder_depth=model.decoder_depth,
        decoder_num_heads=model.decoder_num_heads,
        mlp_ratio=model.mlp_ratio,
        norm_pix_loss=model.norm_pix_loss,
    )


def _optimizer(torch, tmodel, optim_config, device: str):
    params = [p for p in tmodel.parameters() if p.requires_grad]
    decay = [p for n, p in tmodel.named_parameters() if p.requires_grad and p.ndim >= 2 and "token" not in n]
    no_decay = [p for p in params if all(p is not q for q in decay)]
    groups = [{"params": decay, "weight_decay": optim_config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=1e-4, betas=(optim_config.b1, optim_config.b2), eps=optim_config.eps)
    try:  # one fused kernel per step; CPU support depends on the PyTorch build
        return torch.optim.AdamW(groups, fused=True, **kwargs), True
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, **kwargs), False


def measure(config, module_name: str, variant: str, *, steps: int, warmup: int, device: str) -> dict[str, Any]:
    """Time `variant` (TORCH_VARIANTS) of the PyTorch model: median step, warm-up seconds
    (compilation for torch_compile), peak memory."""
    import torch

    from crate_jax import models

    if variant not in TORCH_VARIANTS:
        raise ValueError(f"--torch_variants: {variant!r} is not one of {TORCH_VARIANTS}")
    ref = importlib.import_module(module_name)
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    # XLA:CPU flushes denormals to zero; so does PyTorch with this (CRATE's q = k = v attention
    # puts many denormals into the softmax, which otherwise slow PyTorch down up to 10x).
    flush_denormal = torch.set_flush_denormal(True)
    torch.manual_seed(0)
    model = models.build(config.model.name, **{k: v for k, v in config.model.items() if k != "name"})
    tmodel = build(ref, model).to(device)
    swapped = use_sdpa(ref, tmodel) if variant != "torch_eager" else 0
    opt, fused = _optimizer(torch, tmodel, config.optim, device)
    dtype = str(config.model.dtype)
    autocast = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    forward = torch.compile(tmodel) if variant == "torch_compile" else tmodel
    batch = config.batch_size
    images = torch.randn(batch, 3, model.image_size, model.image_size, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def train_step():
        noise = torch.rand(batch, model.num_patches, device=device)
        with torch.autocast(device_type=device, dtype=autocast, enabled=autocast is not None):
            loss = forward(images, noise, mask_ratio=model.mask_ratio)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(max(warmup, 1)):  # at least one: torch.compile compiles here
        train_step()
    sync()
    warmup_s = time.perf_counter() - t0
    times, cpu_times = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = train_step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    if device == "cuda":
        peak_memory = float(torch.cuda.max_memory_allocated())
        memory_source = "torch.cuda.max_memory_allocated"
    else:
        peak_memory = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        memory_source = "process peak RSS (ru_maxrss)"
    step_s = statistics.median(times)
    return {
        "variant": variant,
        "model": config.model.name,
        "batch_size": batch,
        "image_size": model.image_size,
        "patch_size": model.patch_size,
        "dtype": dtype if autocast is not None else "float32",
        "autocast": dtype if autocast is not None else None,
        "torch_device": device,
        "attention_modules_on_sdpa": swapped,
        "fused_adamw": fused,
        "encoder_tokens": "all" if isinstance(model, models.CrateMAE) else "visible",
        "ista_fused": False if isinstance(model, models.CrateMAE) else None,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "torch_flush_denormal": flush_denormal,
        "images_per_sec": batch / step_s,
        "step_s": step_s,
        "step_times_s": times,
        "cpu_s_per_step": statistics.median(cpu_times),
        "compile_s": warmup_s,  # warm-up steps, torch.compile's compilation included
        "compile_s_is": "warm-up seconds (first steps, compilation included)",
        "peak_memory_bytes": peak_memory,
        "peak_memory_source": memory_source,
        "loss": loss.item(),
    }


def matmul_peak_flops(device: str, size: int, dtype_name: str, repeats: int = 8) -> float:
    """Best FLOP/s of a size³ matmul in PyTorch on `device`."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best
