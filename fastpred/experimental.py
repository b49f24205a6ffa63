"""Experimental solvers for W_p: kept for study, not the default of anything.

``bench/report.md`` ("Solvers") measures both against the eigh path: at the paper's
rho (0.3, F moves far between steps) neither is faster on CPU, so DirectPredictor
uses them only when asked (``solver="newton_schulz"`` / ``"warm"``).

- ``newton_schulz``: for ``power=0.5`` W_p is a scaled square root of F plus a
  multiple of I, so the coupled Newton-Schulz iteration (matmuls only) gives it.
  No eigensolver and no host sync: meant for GPUs, where it is not measured yet.
- ``warm``: refines last step's eigenbasis instead of starting over. In that basis
  F is nearly diagonal; W_p follows to first order from the Daleckii-Krein formula
  (divided differences of the map), and the basis is rotated to follow F. When the
  off-diagonal mass is too large for that, a full eigh (on CUDA one call later, so
  that no call waits for the GPU). Pays off only for a slow EMA (rho >= 0.9).
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor

from . import backends
from .backends import reference
from .eig_map import EigMap
from .eigh import symmetric_eigh
from .schedule import HostCopy
from .solvers import top_eigenvalue


def newton_schulz_sqrt(a: Tensor, iters: int) -> Tensor:
    """Square root of a PSD matrix ``a`` whose eigenvalues lie in [0, ~1].

    Coupled Newton-Schulz: Y_0 = A, Z_0 = I, T = (3I - Z Y)/2, Y <- Y T, Z <- T Z,
    so Y -> A^{1/2} and Z -> A^{-1/2}. In float32 the iteration can drift away
    after it has converged on a rank-deficient A; so the iterate with the smallest
    residual ||I - Z Y|| seen is kept (chosen on the device, no host sync): the
    result is never worse than the best iterate, whatever ``iters`` is.
    """
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    y, z = a, eye.expand_as(a)
    best = y
    best_residual = torch.full(a.shape[:-2], float("inf"), dtype=a.dtype, device=a.device)
    for _ in range(iters):
        zy = z @ y
        residual = torch.linalg.matrix_norm(eye - zy)  # of the current (y, z)
        better = residual < best_residual
        best = torch.where(better[..., None, None], y, best)
        best_residual = torch.where(better, residual, best_residual)
        t = 1.5 * eye - 0.5 * zy
        y, z = y @ t, t @ z
    zy = z @ y
    better = torch.linalg.matrix_norm(eye - zy) < best_residual
    return torch.where(better[..., None, None], y, best)


def newton_schulz_weight(corr: Tensor, top: Tensor | None, eig_map: EigMap, *, iters: int = 15,
                         backend: "str | backends.Backend" = "auto") -> Tensor:
    """W_p of Eq. 18 for power 1/2 (``eig_map.power`` is not read) from matmuls only.

    relative: ``W = (F / s_max)^{1/2} + eps I``; absolute: ``W = F^{1/2} + eps s_max I``,
    with s_max from :func:`fastpred.solvers.top_eigenvalue` (``top``: its warm start,
    updated in place; None: exact, cold). F must be PSD (a correlation is), and in
    relative mode ``eps >= min_eig`` so that the clamp of the map never acts.
    """
    eps, min_eig = eig_map.eps, eig_map.min_eig
    if eig_map.relative and eps < min_eig:
        raise ValueError(f"solver='newton_schulz' needs eps >= min_eig in relative mode, got eps={eps}, min_eig={min_eig}")
    corr = corr.float()
    corr = corr.tril() + corr.tril(-1).mT  # the lower triangle, as eigh reads it
    s_max = top_eigenvalue(corr, top, backend=backend).float()  # (...)
    positive = s_max > 0
    scale = torch.where(positive, s_max, torch.ones_like(s_max))
    root = newton_schulz_sqrt(corr / scale[..., None, None], iters)  # (F / s_max)^{1/2}
    root = torch.where(positive[..., None, None], root, torch.zeros_like(root))
    eye = torch.eye(corr.shape[-1], dtype=corr.dtype, device=corr.device)
    if eig_map.relative:
        # F = 0: p = max(eps, min_eig) = eps, as the eigh path gives.
        return root + eps * eye
    s_max = s_max.clamp(min=0)[..., None, None]
    return s_max.sqrt() * root + eps * s_max * eye


# state tensor -> its last call's refresh decision in flight (CUDA only)
_pending_flags: "weakref.WeakKeyDictionary[Tensor, HostCopy]" = weakref.WeakKeyDictionary()


def _refresh_requested(state: Tensor, flag: Tensor) -> bool:
    """Whether the state asks for a full eigh. On CUDA the flag of the previous call
    arrives through pinned memory (no wait for the current work); the state's own flag
    is read (a host sync) only when no call of this process left one, e.g. after a
    checkpoint was loaded."""
    pending = _pending_flags.pop(state, None)
    if pending is not None:  # recorded a whole call ago: normally landed already
        return bool(pending.wait().any())
    return bool(flag.any())


def warm_eigh_weight(
    corr: Tensor, state: Tensor, eig_map: EigMap, *, backend: str = "auto", max_off: float = 0.05
) -> tuple[Tensor, bool]:
    """W_p from last step's eigenbasis, refined to first order; full eigh when that is unsafe.

    With B the previous basis, A = B^T F B = diag(a) + E (E off-diagonal). To first
    order in E, ``g(F) = B [diag(g(a)) + G o E] B^T`` with G_ij the divided difference
    (g(a_i) - g(a_j)) / (a_i - a_j) (Daleckii-Krein); the error is second order in E.
    The basis is then rotated by the first-order eigenvector correction and
    re-orthonormalised (one Newton-Schulz polar step) so that it keeps tracking F.

    If ``||E||_F > max_off * ||diag(a)||`` (or no basis is known yet), the basis is
    replaced by a full eigendecomposition of F (:func:`fastpred.eigh.symmetric_eigh`
    with ``backend``) and W_p is built from it exactly. On CPU that
    happens in the same call. On CUDA the decision is made on the device and read
    one call late (through pinned memory, so no call waits for the GPU): the call
    that finds F moved too far still returns the first-order refinement, and the
    next call does the full eigh.

    Args:
        state: ``(..., d + 1, d)`` from :func:`init_state`: the basis in the first d
            rows, and in the last row's first entry a flag (nonzero: refresh next).

    Returns:
        ``(W, refreshed)``: refreshed is True when the full eigh was used.
    """
    corr = corr.float()
    d = corr.shape[-1]
    basis, flag = state[..., :d, :], state[..., d, 0]  # views: updated in place
    if _refresh_requested(state, flag):
        s, u = symmetric_eigh(corr, backend=backend)
        basis.copy_(u)
        flag.zero_()
        return reference.rebuild(s, u, eig_map), True
    a = basis.mT @ corr @ basis  # (..., d, d)
    diag = a.diagonal(dim1=-2, dim2=-1)  # (..., d)
    off = a - torch.diag_embed(diag)
    too_far = off.norm(dim=(-2, -1)) > max_off * diag.norm(dim=-1)  # (...)
    if not corr.is_cuda and bool(too_far.any()):  # free on the host
        s, u = symmetric_eigh(corr, backend=backend)
        basis.copy_(u)
        return reference.rebuild(s, u, eig_map), True
    if corr.is_cuda:
        flag.copy_(too_far)
        _pending_flags[state] = HostCopy(flag)
    p = eig_map(diag)  # (..., d)
    gap = diag.unsqueeze(-1) - diag.unsqueeze(-2)  # a_i - a_j
    scale = diag.abs().amax(dim=-1, keepdim=True).unsqueeze(-1).clamp(min=1e-30)
    close = gap.abs() <= 1e-6 * scale
    # Divided differences; for (nearly) equal a_i, a_j the derivative, by a one-sided difference.
    # (Both evaluations share one appended top value, so only a_i moves.)
    h = 1e-3 * scale.squeeze(-1)
    top = diag.amax(-1, keepdim=True) + h
    p_lo = eig_map(torch.cat([diag, top], -1))[..., :-1]
    p_hi = eig_map(torch.cat([diag + h, top], -1))[..., :-1]
    slope = (p_hi - p_lo) / h  # (..., d), the map's derivative at each a_i
    divided = torch.where(close, 0.5 * (slope.unsqueeze(-1) + slope.unsqueeze(-2)), (p.unsqueeze(-1) - p.unsqueeze(-2)) / torch.where(close, 1.0, gap))
    middle = torch.diag_embed(p) + divided * off
    weight = basis @ middle @ basis.mT
    # Follow F: rotate the basis by the first-order eigenvector correction, then re-orthonormalise.
    rotation = off / torch.where(close, 1.0, -gap)  # K_ij = E_ij / (a_j - a_i)
    # Only where first order holds (|K_ij| small); nearly degenerate pairs stay mixed,
    # which the divided differences above already account for.
    rotation = torch.where(close | (rotation.abs() > 0.1), 0.0, rotation)
    moved = basis + basis @ rotation
    eye = torch.eye(corr.shape[-1], dtype=corr.dtype, device=corr.device)
    basis.copy_(moved @ (1.5 * eye - 0.5 * moved.mT @ moved))
    return 0.5 * (weight + weight.mT), False
