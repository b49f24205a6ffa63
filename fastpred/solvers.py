"""Ways to obtain W_p = U diag(g(s)) U^T without a fresh eigendecomposition of F.

Both are alternatives to ``solver="eigh"`` (the default), selected through
:func:`fastpred.functional.directpred_weight` and ``DirectPredictor(solver=...)``:

- ``newton_schulz``: for ``power=0.5`` W_p is a scaled square root of F plus a
  multiple of I, so the coupled Newton-Schulz iteration (matmuls only) gives it.
  No eigensolver, no host sync, capturable in a CUDA graph: the natural GPU path.
- ``warm``: refines last step's eigenbasis instead of starting over. In that basis
  F is nearly diagonal; W_p follows to first order from the Daleckii-Krein formula
  (divided differences of the map), and the basis is rotated to follow F. When the
  off-diagonal mass is too large for that, it falls back to a full eigh.

Each keeps a small state tensor between calls (a block of top eigenvectors, or the basis),
owned by the caller and updated in place, so that a module can checkpoint it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .backends import reference

SOLVERS = ("eigh", "newton_schulz", "warm")


def init_state(solver: str, corr: Tensor) -> Tensor | None:
    """The state ``solver`` keeps between calls, primed for the correlation ``corr``.

    newton_schulz: an orthonormal block spanning F's top eigenvectors, by a long
    subspace iteration (later calls then need only a few steps). warm: all zeros,
    meaning "no basis yet" (the first call does a full eigh). eigh: None.
    """
    if solver == "newton_schulz":
        d = corr.shape[-1]
        block = torch.eye(d, min(TOP_BLOCK, d), dtype=torch.float32, device=corr.device)
        block = (block + 0.01).expand(*corr.shape[:-2], d, block.shape[-1]).clone()
        top_eigenvalue(corr.float(), block, iters=COLD_ITERS)
        return block
    if solver == "warm":
        return torch.zeros_like(corr, dtype=torch.float32)
    return None


TOP_BLOCK = 16  # width of the block that tracks F's top eigenvectors
COLD_ITERS = 100


def top_eigenvalue(corr: Tensor, block: Tensor, iters: int = 4) -> Tensor:
    """Largest eigenvalue of a PSD ``corr`` by subspace iteration on ``block`` (updated in place).

    ``block`` ``(..., d, r)`` spans last step's top eigenvectors; a few products
    with F and a QR re-orthonormalisation refresh it, and the largest Ritz value
    (the top eigenvalue of the r x r matrix Q^T F Q, itself by power iteration)
    estimates s_max. A block rather than one vector because F's top eigenvalues are
    often close together, where a single vector converges slowly. No host sync.
    Returns ``(...,)``.
    """
    q = block
    for _ in range(iters):
        q, _ = torch.linalg.qr(corr @ q)  # (..., d, r)
    block.copy_(q)
    ritz = q.mT @ corr @ q  # (..., r, r)
    # Its top eigenvector by repeated squaring: ritz^(2^12) has rank one to working precision.
    power = ritz
    for _ in range(12):
        power = power @ power
        power = power / power.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None].clamp(min=1e-30)
    v = power.sum(-1)  # (..., r): a combination of columns, all along the top eigenvector
    v = v / v.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    return (v * (ritz @ v.unsqueeze(-1)).squeeze(-1)).sum(-1)


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


def newton_schulz_weight(
    corr: Tensor, top_block: Tensor, *, eps: float, eps_mode: str, min_eig: float, iters: int = 15
) -> Tensor:
    """W_p of Eq. 18 for power 1/2 from matmuls only.

    relative: ``W = (F / s_max)^{1/2} + eps I``; absolute: ``W = F^{1/2} + eps s_max I``,
    with s_max from :func:`top_eigenvalue`. F must be PSD (a correlation is), and in
    relative mode ``eps >= min_eig`` so that the clamp of the map never acts.
    """
    if eps_mode == "relative" and eps < min_eig:
        raise ValueError(f"solver='newton_schulz' needs eps >= min_eig in relative mode, got eps={eps}, min_eig={min_eig}")
    corr = corr.float()
    s_max = top_eigenvalue(corr, top_block)  # (...)
    positive = s_max > 0
    scale = torch.where(positive, s_max, torch.ones_like(s_max))
    root = newton_schulz_sqrt(corr / scale[..., None, None], iters)  # (F / s_max)^{1/2}
    root = torch.where(positive[..., None, None], root, torch.zeros_like(root))
    eye = torch.eye(corr.shape[-1], dtype=corr.dtype, device=corr.device)
    if eps_mode == "relative":
        # F = 0: p = max(eps, min_eig) = eps, as the eigh path gives.
        return root + eps * eye
    s_max = s_max.clamp(min=0)[..., None, None]
    return s_max.sqrt() * root + eps * s_max * eye


def warm_eigh_weight(
    corr: Tensor,
    basis: Tensor,
    eigh,
    *,
    eps: float,
    power: float,
    eps_mode: str,
    min_eig: float,
    max_off: float = 0.05,
) -> tuple[Tensor, bool]:
    """W_p from last step's eigenbasis, refined to first order; full eigh when that is unsafe.

    With B the previous basis, A = B^T F B = diag(a) + E (E off-diagonal). To first
    order in E, ``g(F) = B [diag(g(a)) + G o E] B^T`` with G_ij the divided difference
    (g(a_i) - g(a_j)) / (a_i - a_j) (Daleckii-Krein); the error is second order in E.
    The basis is then rotated by the first-order eigenvector correction and
    re-orthonormalised (one Newton-Schulz polar step) so that it keeps tracking F.

    If ``||E||_F > max_off * ||diag(a)||`` (or no basis is known yet), the basis is
    replaced by a full ``eigh(F)`` and W_p is built from it exactly.

    Returns:
        ``(W, refreshed)``: refreshed is True when the full eigh was used.
    """
    corr = corr.float()
    a = basis.mT @ corr @ basis  # (..., d, d)
    diag = a.diagonal(dim1=-2, dim2=-1)  # (..., d)
    off = a - torch.diag_embed(diag)
    known = bool(basis.abs().amax() > 0)
    if not known or bool((off.norm(dim=(-2, -1)) > max_off * diag.norm(dim=-1)).any()):
        s, u = eigh(corr)
        basis.copy_(u)
        return reference.rebuild(s, u, eps, power, eps_mode, min_eig), True
    p = reference.eig_map(diag, eps, power, eps_mode, min_eig)  # (..., d)
    gap = diag.unsqueeze(-1) - diag.unsqueeze(-2)  # a_i - a_j
    scale = diag.abs().amax(dim=-1, keepdim=True).unsqueeze(-1).clamp(min=1e-30)
    close = gap.abs() <= 1e-6 * scale
    # Divided differences; for (nearly) equal a_i, a_j the derivative, by a one-sided difference.
    # (Both evaluations share one appended top value, so only a_i moves.)
    h = 1e-3 * scale.squeeze(-1)
    top = diag.amax(-1, keepdim=True) + h
    p_lo = reference.eig_map(torch.cat([diag, top], -1), eps, power, eps_mode, min_eig)[..., :-1]
    p_hi = reference.eig_map(torch.cat([diag + h, top], -1), eps, power, eps_mode, min_eig)[..., :-1]
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
