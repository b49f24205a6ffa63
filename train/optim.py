"""Optimizers and schedules: SGD or LARS with bias/BN exclusions, linear warm-up then cosine
learning rate, and BYOL's cosine schedule of the target EMA coefficient."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn

from .config import OptimConfig


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as in BYOL.

    Per parameter: d = g + wd * w; if the group has ``lars=True`` and both norms are positive,
    d <- eta * ||w|| / ||d|| * d; then m <- momentum * m + d and w <- w - lr * m.
    Groups with ``lars=False`` (biases, BatchNorm) skip the adaptation; their weight decay is set
    to 0 by :func:`param_groups`.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS: invalid lr={lr}, momentum={momentum}, weight_decay={weight_decay} or eta={eta}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["weight_decay"]:
                    d = d.add(p, alpha=group["weight_decay"])
                if group["lars"]:
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0), group["eta"] * w_norm / d_norm,
                                        torch.ones_like(w_norm))
                    d = d * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])
        return loss


def is_excluded(p: nn.Parameter) -> bool:
    """Biases and normalisation weights: every parameter with fewer than 2 dimensions."""
    return p.ndim < 2


def param_groups(model: nn.Module, weight_decay: float, exclude_bias_bn: bool) -> list[dict]:
    """Trainable parameters in two groups: regular, and (when ``exclude_bias_bn``) biases + BN
    with ``weight_decay=0`` and ``lars=False`` (BYOL's exclusions)."""
    regular, excluded = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (excluded if exclude_bias_bn and is_excluded(p) else regular).append(p)
    groups = [{"params": regular, "weight_decay": weight_decay, "lars": True}]
    if excluded:
        groups.append({"params": excluded, "weight_decay": 0.0, "lars": False})
    return groups


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """``lr`` scaled by global_batch / lr_batch when lr_batch > 0 (BYOL: 0.2 x batch / 256)."""
    return cfg.lr * global_batch / cfg.lr_batch if cfg.lr_batch > 0 else cfg.lr


def build_optimizer(cfg: OptimConfig, model: nn.Module, global_batch: int) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.exclude_bias_bn)
    lr = scaled_lr(cfg, global_batch)
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, eta=cfg.lars_eta)
    if cfg.name == "sgd":
        for g in groups:
            g.pop("lars")
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name={cfg.name!r}: expected sgd or lars")


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Warm-up: step / warmup_steps (0 at step 0, as in BYOL). Then ``constant``: 1, or ``cosine``:
    (1 + cos(pi * (step - warmup) / (total - warmup))) / 2, reaching 0 at ``total_steps``.
    """
    if step < warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"optim.schedule={schedule!r}: expected constant or cosine")


def build_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR (stepped after every optimizer step). Its saved state is the step count;
    the schedule itself comes from the current config (a partial saves no attributes)."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    lr_factor(0, total_steps, warmup, cfg.schedule)  # an unknown schedule name fails now
    fn = functools.partial(lr_factor, total_steps=total_steps, warmup_steps=warmup, schedule=cfg.schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def ema_tau(step: int, total_steps: int, base: float, schedule: str) -> float:
    """Target EMA coefficient at step ``step``: ``constant`` base, or BYOL's
    1 - (1 - base) * (cos(pi * step / total) + 1) / 2 (base at step 0, 1 at the end)."""
    if schedule == "constant":
        return base
    if schedule == "cosine":
        return 1.0 - (1.0 - base) * (math.cos(math.pi * min(step, total_steps) / max(1, total_steps)) + 1.0) / 2.0
    raise ValueError(f"model.ema_schedule={schedule!r}: expected constant or cosine")
