"""PyTorch ports of FAIR MAE's three training loops and its classifier, for step-level parity.

Written from the published behaviour of facebookresearch/mae (`main_pretrain.py` +
`engine_pretrain.py`, `main_finetune.py` + `engine_finetune.py`, `main_linprobe.py`,
`util/lr_sched.py`, `util/lr_decay.py`, `util/lars.py`) and timm 0.3.2's `add_weight_decay`
and `LabelSmoothingCrossEntropy`; fp32 on CPU, no autocast, no loss scaler (its unscaled
fp32 path is a plain `backward` + `step`), no timm.

* `Classifier`     models_vit's VisionTransformer: patch_embed, cls_token, a trained
                   `pos_embed`, `blocks` (timm ViT blocks, or the CRATE-MAE release's encoder
                   layers for the CRATE encoder), then `norm` + cls token, or mean of the patch
                   tokens + `fc_norm` (global_pool), then `head`.
* `make_linprobe`  main_linprobe's surgery: head = Sequential(BatchNorm1d(affine=False,
                   eps=1e-6), head); everything but the head frozen.
* `add_weight_decay`, `param_groups_lrd`, `LARS`, `adjust_learning_rate`: the optimizer side.
* `train_pretrain`, `train_classifier`: the per-iteration loops (gradient accumulation:
  `loss / accum_iter`, update every `accum_iter` micro-batches, the lr set at the first
  micro-batch of each update from `data_iter_step / len(data_loader) + epoch`).

The masking noise of pretraining is an argument of the reference models (tests/torch_*_mae.py)
instead of `torch.rand` inside them, so the loop is fed the trainer's own noise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.torch_crate_mae import CrateEncoderBlock
from tests.torch_fair_mae import Block
from tests.torch_mae_common import PatchEmbed, get_2d_sincos_pos_embed


# ----------------------------------------------------------------------------- the classifier
class Classifier(nn.Module):
    """models_vit.VisionTransformer (timm 0.3.2 forward: features -> head), either backbone."""

    def __init__(self, *, arch: str, img_size: int, patch_size: int, dim: int, depth: int, heads: int,
                 num_classes: int, global_pool: bool, ista_step: float = 0.1, ista_lambda: float = 0.5):  # fmt: skip
        super().__init__()
        self.global_pool = global_pool
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))  # trained, as timm's
        table = get_2d_sincos_pos_embed(dim, self.patch_embed.grid_size, cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(table).float()[None])  # what a MAE checkpoint stores
        if arch == "crate":
            blocks = [CrateEncoderBlock(dim, heads, dim // heads, ista_step, ista_lambda) for _ in range(depth)]
        else:
            blocks = [Block(dim, heads, 4.0, 1e-6) for _ in range(depth)]
        self.blocks = nn.ModuleList(blocks)
        if global_pool:
            self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        else:
            self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def no_weight_decay(self):
        return {"pos_embed", "cls_token", "dist_token"}

    def forward_features(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        if self.global_pool:
            return self.fc_norm(x[:, 1:, :].mean(dim=1))
        return self.norm(x)[:, 0]

    def forward(self, x):
        return self.head(self.forward_features(x))


def make_linprobe(model: Classifier) -> Classifier:
    """main_linprobe: BatchNorm1d without affine before the Linear head; only the head trains."""
    model.head = nn.Sequential(nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head)
    for p in model.parameters():
        p.requires_grad = False
    for p in model.head.parameters():
        p.requires_grad = True
    return model


# ----------------------------------------------------------------------------- optimizers
def add_weight_decay(model: nn.Module, weight_decay: float, skip_list: Sequence[str] = ()):
    """timm 0.3.2: no decay for 1-D parameters, `.bias` and names in skip_list; frozen ones left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or name.endswith(".bias") or name in skip_list:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def layer_id_for_vit(name: str, num_layers: int) -> int:
    """util/lr_decay.get_layer_id_for_vit."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_lrd(model: Classifier, weight_decay: float, no_weight_decay_list, layer_decay: float):
    """util/lr_decay.param_groups_lrd: one group per (layer id, decay or not), lr_scale
    layer_decay^(num_layers - layer id) with num_layers = len(blocks) + 1."""
    num_layers = len(model.blocks) + 1
    scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name in no_weight_decay_list
        layer = layer_id_for_vit(name, num_layers)
        key = f"layer_{layer}_{'no_decay' if no_decay else 'decay'}"
        group = groups.setdefault(
            key, {"lr_scale": scales[layer], "weight_decay": 0.0 if no_decay else weight_decay, "params": []}
        )
        group["params"].append(p)
    return list(groups.values())


class LARS(torch.optim.Optimizer):
    """util/lars.py (MoCo v3): for parameters of rank > 1, add weight decay and scale by the
    trust ratio trust_coefficient |p| / |dp| (1 where a norm is 0); then momentum; then lr."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))  # fmt: skip

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    p_norm, dp_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(p_norm)
                    ratio = torch.where(
                        p_norm > 0, torch.where(dp_norm > 0, g["trust_coefficient"] * p_norm / dp_norm, one), one
                    )
                    dp = dp.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(g["momentum"]).add_(dp)
                p.add_(state["mu"], alpha=-g["lr"])


def adjust_learning_rate(optimizer, epoch: float, args) -> float:
    """util/lr_sched: linear warmup over warmup_epochs, then half-cycle cosine to min_lr."""
    if epoch < args.warmup_epochs:
        lr = args.lr * epoch / args.warmup_epochs
    else:
        progress = (epoch - args.warmup_epochs) / (args.epochs - args.warmup_epochs)
        lr = args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr
    return lr


def label_smoothing_cross_entropy(smoothing: float):
    """timm's LabelSmoothingCrossEntropy: (1 - s) NLL + s x mean over classes of -log p."""

    def criterion(logits, target):
        logprobs = F.log_softmax(logits, dim=-1)
        nll = -logprobs.gather(dim=-1, index=target[:, None]).squeeze(1)
        return ((1.0 - smoothing) * nll + smoothing * -logprobs.mean(dim=-1)).mean()

    return criterion


# ----------------------------------------------------------------------------- the loops
def loop_args(*, lr: float, min_lr: float, warmup_epochs: float, epochs: int, accum_iter: int) -> SimpleNamespace:
    return SimpleNamespace(lr=lr, min_lr=min_lr, warmup_epochs=warmup_epochs, epochs=epochs, accum_iter=accum_iter)


def _epoch(model, data_loader: Sequence, optimizer, epoch: int, args, forward) -> list[tuple[float, float]]:
    """One epoch of engine_*.train_one_epoch: [(update's mean loss, its lr)] per update."""
    model.train(True)
    optimizer.zero_grad()
    out, losses, lr = [], [], 0.0
    for data_iter_step, batch in enumerate(data_loader):
        if data_iter_step % args.accum_iter == 0:
            lr = adjust_learning_rate(optimizer, data_iter_step / len(data_loader) + epoch, args)
        loss = forward(batch)
        losses.append(loss.item())
        (loss / args.accum_iter).backward()
        if (data_iter_step + 1) % args.accum_iter == 0:
            optimizer.step()
            optimizer.zero_grad()
            out.append((sum(losses) / len(losses), lr))
            losses = []
    return out


def train_pretrain(model, epochs: Iterable[Sequence], optimizer, args, mask_ratio: float):
    """engine_pretrain over epochs of micro-batches (images NCHW, masking noise)."""
    out = []
    for epoch, loader in enumerate(epochs):
        out += _epoch(model, loader, optimizer, epoch, args, lambda b: model(b[0], b[1], mask_ratio=mask_ratio)["loss"])
    return out


def train_classifier(model, criterion, epochs: Iterable[Sequence], optimizer, args):
    """engine_finetune (the linear probe runs it too) over epochs of micro-batches (images, labels)."""
    out = []
    for epoch, loader in enumerate(epochs):
        out += _epoch(model, loader, optimizer, epoch, args, lambda b: criterion(model(b[0]), b[1]))
    return out
