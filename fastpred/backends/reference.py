"""The torch reference backend: plain PyTorch, any device, any leading batch shape.

Every other backend computes exactly these functions and is tested against them.
Shapes: ``x`` is ``(..., N, d)``, ``corr`` is ``(..., d, d)``, ``s`` is ``(..., d)``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..eig_map import EigMap


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


def fold_(corr: Tensor, gram: Tensor, total: Tensor, count: Tensor, first: Tensor, rho: float,
          mean: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Fold one step's summed moments into F (Eq. 19) in place, judged by those moments.

    ``usable``: every entry of ``gram``, ``total`` and ``count`` is finite (one decision
    for the whole stack: a non-finite feature, or an x^T x that overflowed, spoils the
    step). Per F, ``weight = 1`` where ``first``, ``1 - rho`` otherwise, and ``0`` where
    the step is not usable or that F's ``count`` is 0; then
    ``corr <- corr + weight (gram / count - corr)`` (:func:`ema_`: 1 overwrites, 0 keeps
    whatever ``gram`` holds) and, when given, ``mean <- mean + weight (total / count - mean)``.

    Shapes: ``corr``/``gram`` ``(..., d, d)``, ``total``/``mean`` ``(..., d)``, ``count`` and
    ``first`` (bool) ``(...)``; float32 on one device. Decided on the device (no host sync).

    Returns:
        ``(weight, usable)``: the float32 weight per F ``(...)`` and the 0-dim bool.
    """
    usable = torch.isfinite(gram).all() & torch.isfinite(total).all() & torch.isfinite(count).all()
    weight = torch.where(usable & (count > 0), torch.where(first, 1.0, 1.0 - rho), 0.0).float()
    n = count.clamp(min=1)
    ema_(corr, gram / n[..., None, None], weight[..., None, None])
    if mean is not None:
        ema_(mean, total / n[..., None], weight[..., None])
    return weight, usable


def install_(weight: Tensor, new: Tensor) -> Tensor:
    """``weight <- new`` in place where every entry of ``new`` is finite, else ``weight``
    is kept whole. Decided on the device (no host sync). Returns the 0-dim bool "installed"."""
    ok = torch.isfinite(new).all()
    weight.copy_(torch.where(ok, new, weight))
    return ok


def eigh(corr: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric matrix (lower triangle read)."""
    return torch.linalg.eigh(corr)


def rebuild(s: Tensor, u: Tensor, eig_map: EigMap) -> Tensor:
    """W = U diag(p) U^T with p = eig_map(s): symmetric, shares F's eigenvectors (Eq. 18)."""
    p = eig_map(s)  # >= eps >= 0 (EigMap refuses a negative eps): W = V V^T with V = U diag(sqrt p)
    v = u * p.sqrt().unsqueeze(-2)  # (..., d, d)
    return v @ v.mT
