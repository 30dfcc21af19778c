"""The optimisation pieces of ``optim:``: the loss, Adam with its warm-up + cosine schedule, mixed precision, EMA."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from megan_fast.training.config import OptimConfig

__all__ = ["build_optimizer", "charbonnier", "lr_at", "mixed_precision", "update_ema"]


def charbonnier(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """mean(sqrt((pred - target)^2 + eps^2))."""
    return torch.sqrt((pred - target) ** 2 + eps * eps).mean()


def lr_at(it: int, optim: OptimConfig) -> float:
    """Linear warm-up, then cosine annealing from lr to eta_min over the remaining iterations."""
    warm = int(optim.warmup_iterations)
    if it < warm:
        return optim.lr * (it + 1) / warm
    total = max(1, optim.iterations - warm)
    progress = min(1.0, (it - warm) / total)
    return optim.eta_min + 0.5 * (optim.lr - optim.eta_min) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, optim: OptimConfig):
    """(Adam, its LambdaLR scheduler following :func:`lr_at`) over ``model``'s parameters."""
    optimizer = torch.optim.Adam(model.parameters(), lr=optim.lr, betas=tuple(optim.betas),
                                 weight_decay=optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_at(it, optim) / optim.lr)
    return optimizer, scheduler


def mixed_precision(autocast: str, dev: torch.device):
    """(autocast dtype or None, whether autocast is on, gradient scaler) for ``optim.autocast`` on ``dev``."""
    amp_dtype = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[autocast]
    use_amp = amp_dtype is not None and dev.type == "cuda"
    if amp_dtype is not None and not use_amp:
        warnings.warn(f"optim.autocast {autocast} applies on CUDA devices only; training in float32 on {dev.type}",
                      stacklevel=3)
    return amp_dtype, use_amp, torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model, parameter by parameter; buffers are copied."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)
