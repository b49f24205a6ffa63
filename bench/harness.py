"""Shared benchmark pieces: interleaved timing, inputs, and the authors' update as a baseline.

Timings are taken round-robin (case A, B, C, A, B, C, ...) so that a slow spell of the
machine hits every case alike; ratios are computed from medians of the same run.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

import fastpred.functional as F


def inputs(dim: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features x (n, dim) with a non-trivial spectrum, and a correlation matrix warmed on them."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) / dim**0.5 + torch.eye(dim)
    x = torch.randn(n, dim, generator=g) @ mix
    corr = x.T @ x / n
    return x, corr


def authors_update(corr: torch.Tensor, x: torch.Tensor, rho: float = 0.3, eps: float = 0.1) -> torch.Tensor:
    """The authors' trainer, step for step, for a batch of both views ``x = cat(view1, view2)``:
    per view, per-sample outer products (B x d x d) checked for NaN; both concatenated
    and averaged; the EMA; the general non-symmetric eigensolver (``torch.eig`` then,
    ``torch.linalg.eig`` now, real parts kept); ``boost_scale``; Q diag(p) Q^T."""
    outers = []
    for view in x.chunk(2):
        outer = torch.bmm(view.unsqueeze(2), view.unsqueeze(1))  # (B, d, d)
        if torch.isnan(outer).any().item():  # their check_valid / pdb guard
            raise FloatingPointError("NaN in features")
        outers.append(outer)
    corr.mul_(rho).add_(torch.cat(outers, dim=0).mean(dim=0), alpha=1 - rho)
    d, q = torch.linalg.eig(corr)
    d, q = d.real, q.real
    p = (d.clamp(0) / d.max()).pow(0.5) + eps
    p = p.clamp(1e-4)
    return q @ p.diag() @ q.t()


def fastpred_update(corr: torch.Tensor, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """fastpred's full update: statistics (Eq. 19), eigendecomposition, map and rebuild (Eq. 18)."""
    F.corr_ema_(corr, x, 0.3, backend=backend)
    return F.directpred_weight(corr, backend=backend)


def time_interleaved(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each case, measured round-robin ``repeats`` times."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


def spread_ms(samples: list[float]) -> tuple[float, float]:
    """Interquartile range in milliseconds."""
    q = statistics.quantiles(samples, n=4)
    return 1e3 * q[0], 1e3 * q[2]
