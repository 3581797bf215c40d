"""Optimizer and learning-rate schedule.

Only trainable parameters are optimised (the resampler, the gated cross-attention blocks, the added token rows;
the backbones too when unfrozen). Weight decay goes where OpenFlamingo applies it -- the parameters of the gated
cross-attention layers -- and nowhere else. The schedule is a linear warmup followed by cosine decay, linear decay
or a constant rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .config import OptimConfig

DECAY_MARKER = "gated_cross_attn"  # OpenFlamingo: weight decay only on parameters whose name contains it


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose next ``step()`` can be turned into a no-op (``skip_next_step = True``).

    A step whose loss was not finite on some rank is skipped this way on every rank: the parameters and the
    moment estimates stay as they were, whatever DeepSpeed wrapper calls ``step()``.
    """

    skip_next_step: bool = False

    @torch.no_grad()
    def step(self, closure=None):
        if self.skip_next_step:
            return None
        return super().step(closure)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters, split into a decayed group (gated cross-attention) and an undecayed one."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if DECAY_MARKER in name else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"}]
    groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> SkippableAdamW:
    return SkippableAdamW(
        parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
    )


def lr_multiplier(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Factor of ``cfg.lr`` after ``step`` applied optimizer steps."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        if cfg.schedule == "linear":
            return 1.0 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, total_steps))
