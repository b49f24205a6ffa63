"""The torch reference backend: plain PyTorch, any device, any leading batch shape.

Every other backend computes exactly these functions and is tested against them.
Shapes: ``x`` is ``(..., N, d)``, ``corr`` is ``(..., d, d)``, ``s`` is ``(..., d)``.
"""
from __future__ import annotations

import torch
from torch import Tensor


def gram(x: Tensor) -> Tensor:
    """Sum of outer products ``x^T x`` in float32, ``(..., d, d)``.

    One GEMM; the per-sample outer products of the authors' code are never formed,
    so the memory of an update is O(d^2) whatever N is.
    """
    x = x.float()
    return x.mT @ x  # (..., d, d)


def corr_ema_(corr: Tensor, x: Tensor, weight: float | Tensor, mean: Tensor | None = None) -> Tensor:
    """Eq. 19 in place: ``corr <- corr + weight * (x^T x / N - corr)``.

    ``weight`` is ``1 - rho`` for an ordinary update and ``1`` for the first one
    (the authors set F to the first batch correlation); it may be a 0-dim tensor so
    that a caller can decide on the device, without a host sync. ``weight == 1``
    overwrites ``corr`` (and ``mean``) whatever they held, NaN included; ``weight == 0``
    leaves them as they are. ``mean`` (``(..., d)``), when given, gets the same EMA of
    the batch mean of x.
    """
    n = x.shape[-2]
    xf = x.float()
    ema_(corr, gram(xf) / n, weight)
    if mean is not None:
        ema_(mean, xf.mean(dim=-2), weight)
    return corr


def ema_(state: Tensor, batch: Tensor, weight: float | Tensor) -> Tensor:
    """The EMA blend of Eq. 19 in place: ``state <- state + weight * (batch - state)``.

    ``weight`` is ``1 - rho``, ``1`` (overwrite, whatever ``state`` held, NaN included)
    or ``0`` (keep ``state``, whatever ``batch`` holds); a float, or a tensor that
    broadcasts against ``state`` (decided on the device, no host sync).
    """
    if isinstance(weight, Tensor):
        blended = torch.where(weight == 0, state, state.lerp(batch, weight.to(state.dtype)))
        return state.copy_(torch.where(weight == 1, batch, blended))
    if weight == 1:
        return state.copy_(batch)
    return state.lerp_(batch, weight) if weight != 0 else state


def eigh(corr: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric matrix (lower triangle read)."""
    return torch.linalg.eigh(corr)


def eig_map(s: Tensor, eps: float, power: float, eps_mode: str, min_eig: float) -> Tensor:
    """The eigenvalue map p = g(s) of Eq. 18, in both forms.

    ``relative`` (the authors' ``boost_scale``, which produced the paper's tables):
        p = (max(s, 0) / max_j s_j) ** power + eps, then p = max(p, min_eig).
    ``absolute`` (Eq. 18 as printed, with power 1/2):
        p = max(s, 0) ** power + eps * max_j s_j.

    A matrix whose largest eigenvalue is not positive (F all zeros, say) maps to
    ``p = max(eps, min_eig)`` everywhere in relative mode (W_p = that multiple of I)
    and to ``p = 0`` in absolute mode: always finite.
    """
    s = s.clamp(min=0)
    s_max = s.amax(dim=-1, keepdim=True)  # (..., 1)
    if eps_mode == "relative":
        # Where s_max == 0 every s is 0: divide by 1 instead of 0 to stay finite.
        ratio = s / torch.where(s_max > 0, s_max, torch.ones_like(s_max))
        return (ratio.pow(power) + eps).clamp(min=min_eig)
    return s.pow(power) + eps * s_max


def rebuild(s: Tensor, u: Tensor, eps: float, power: float, eps_mode: str, min_eig: float) -> Tensor:
    """W = U diag(p) U^T with p = eig_map(s): symmetric, shares F's eigenvectors (Eq. 18)."""
    p = eig_map(s, eps, power, eps_mode, min_eig)
    if nonnegative_map(eps, eps_mode, min_eig):
        # p >= 0 is known without looking at it: W = V V^T with V = U diag(sqrt p).
        v = u * p.sqrt().unsqueeze(-2)  # (..., d, d)
        return v @ v.mT
    return (u * p.unsqueeze(-2)) @ u.mT


def nonnegative_map(eps: float, eps_mode: str, min_eig: float) -> bool:
    """Whether eig_map can only return p >= 0 for these settings (decided without data)."""
    return min_eig >= 0 if eps_mode == "relative" else eps >= 0
