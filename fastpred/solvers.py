"""Ways to obtain W_p = U diag(g(s)) U^T without a fresh eigendecomposition of F.

- **DirectCopy's closed form** (power 1, relative mode, ``eps >= min_eig``): then
  ``p = s / s_max + eps`` for every eigenvalue, so ``W_p = F / s_max + eps I``
  exactly (DESIGN.md section 5): only the top eigenvalue is needed, by a Lanczos
  iteration warm-started from the last top eigenvector (:func:`directcopy_weight`).
  ``functional.directpred_weight`` uses it by default wherever it holds.

The two others are alternatives to ``solver="eigh"`` (the default), selected through
:func:`fastpred.functional.directpred_weight` and ``DirectPredictor(solver=...)``:

- ``newton_schulz``: for ``power=0.5`` W_p is a scaled square root of F plus a
  multiple of I, so the coupled Newton-Schulz iteration (matmuls only) gives it.
  No eigensolver, no host sync, capturable in a CUDA graph: the natural GPU path.
- ``warm``: refines last step's eigenbasis instead of starting over. In that basis
  F is nearly diagonal; W_p follows to first order from the Daleckii-Krein formula
  (divided differences of the map), and the basis is rotated to follow F. When the
  off-diagonal mass is too large for that, the next call does a full eigh (the
  decision is read one call late, so that no call waits for the GPU).

Each keeps a small state tensor between calls (the top eigenvector, a block of top
eigenvectors, or the basis), owned by the caller and updated in place, so that a
module can checkpoint it. :func:`init_state` makes it.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor

from . import backends
from .backends import reference
from .eig_map import EigMap
from .eigh import symmetric_eigh

SOLVERS = ("eigh", "newton_schulz", "warm")


def init_state(solver: str, corr: Tensor) -> Tensor:
    """The state ``solver`` keeps between calls, primed for the correlation ``corr``.

    eigh: F's top eigenvector ``(..., d)``, the warm start of the power-1 closed form
    (:func:`directcopy_weight`; other settings of the eigh path ignore it).
    newton_schulz: an orthonormal block spanning F's top eigenvectors, by a long
    subspace iteration (later calls then need only a few steps). warm: ``(..., d + 1, d)``,
    the basis (all zeros: none yet) and a last row whose first entry, 1, asks the
    next call for a full eigh.
    """
    if solver == "newton_schulz":
        d = corr.shape[-1]
        block = torch.eye(d, min(TOP_BLOCK, d), dtype=torch.float32, device=corr.device)
        block = (block + 0.01).expand(*corr.shape[:-2], d, block.shape[-1]).clone()
        top_eigenvalue(corr.float(), block, iters=COLD_ITERS)
        return block
    if solver == "warm":
        d = corr.shape[-1]
        state = torch.zeros(*corr.shape[:-2], d + 1, d, dtype=torch.float32, device=corr.device)
        state[..., d, 0] = 1.0  # no basis yet: refresh
        return state
    if solver == "eigh":
        top = torch.zeros(corr.shape[:-1], dtype=torch.float32, device=corr.device)
        top_eigenpair(corr, top, cold=True)
        return top
    raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")


# ------------------------------------------------------------ DirectCopy's closed form
WARM_STEPS = 8  # Krylov dimension from last call's top eigenvector
COLD_STEPS = 64  # Lanczos steps from a fixed start vector


def top_eigenpair(corr: Tensor, top: Tensor | None = None, *, cold: bool | None = None,
                  backend: str = "auto") -> Tensor:
    """Largest eigenvalue ``(...,)`` of a symmetric PSD ``corr`` (its lower triangle),
    by Rayleigh-Ritz on a small Krylov subspace; ``top`` (``(..., d)``, the last top
    eigenvector) starts it and receives the new one.

    Warm (the default when ``top`` is given): the subspace spanned by
    ``v, Fv, ..., F^7 v`` (normalised columns, orthonormalised by one QR in float64).
    It contains v, so the estimate is never below v's Rayleigh quotient, whose error
    is quadratic in v's angle to the top eigenvector. Cold (``top`` None, or
    ``cold=True``): 64 Lanczos steps from a fixed vector. The
    small projected matrix ``Q^T F Q`` is decomposed by ``backend``'s eigensolver
    (on CUDA cuSOLVER without a host sync). A fixed amount of work, no
    data-dependent branch. From a cold start a cluster of top eigenvalues within a
    relative gap g limits the accuracy to about g; the warm start carries the
    convergence on from call to call.
    """
    f = corr.double()
    f = f.tril() + f.tril(-1).mT  # the lower triangle, as eigh reads it
    return _top_eigenpair(f, top, top is None if cold is None else cold, backend)


def _top_eigenpair(f: Tensor, top: Tensor | None, cold: bool, backend: str) -> Tensor:
    """:func:`top_eigenpair` of a float64 symmetric ``f``."""
    d = f.shape[-1]
    if cold:
        q = _lanczos_basis(f, _probe(0, d, f), min(COLD_STEPS, d))
    else:
        warm = top.double()
        norm = warm.norm(dim=-1, keepdim=True)
        start = torch.where(norm > 0, warm / norm.clamp(min=1e-300), _probe(0, d, f))
        q = _krylov_basis(f, start, min(WARM_STEPS, d))
    projected = q.mT @ f @ q  # (..., k, k)
    # A non-finite F: NaN out (decided on the device), rather than an eigensolver error.
    finite = torch.isfinite(projected).all(-1).all(-1)  # (...)
    projected = torch.where(finite[..., None, None], projected, torch.zeros_like(projected))
    values, vectors = backends.resolve(backend, f.device).eigh(projected)
    if top is not None:
        top.copy_((q @ vectors[..., -1:]).squeeze(-1))  # the Ritz vector
    return torch.where(finite, values[..., -1], torch.full_like(values[..., -1], float("nan")))


def _krylov_basis(f: Tensor, v: Tensor, k: int) -> Tensor:
    """Orthonormal ``(..., d, k)`` basis of span(v, Fv, ..., F^(k-1) v); its first column is v."""
    columns = [v]
    for _ in range(k - 1):
        w = (f @ columns[-1].unsqueeze(-1)).squeeze(-1)
        columns.append(w / w.norm(dim=-1, keepdim=True).clamp(min=1e-300))
    q, _ = torch.linalg.qr(torch.stack(columns, -1))
    return q


def _lanczos_basis(f: Tensor, v: Tensor, m: int) -> Tensor:
    """Lanczos vectors ``(..., d, m)`` from unit v, fully re-orthogonalised; where the
    Krylov space closes early (F of low rank) a fixed probe vector continues it."""
    d = f.shape[-1]
    scale = f.diagonal(dim1=-2, dim2=-1).abs().sum(-1, keepdim=True).clamp(min=1e-300)  # >= ||F||_2
    basis = f.new_zeros(*f.shape[:-2], d, m)
    for k in range(m):
        basis[..., k] = v
        if k == m - 1:
            break
        done = basis[..., : k + 1]
        w = _orthogonalize((f @ v.unsqueeze(-1)).squeeze(-1), done)
        closed = w.norm(dim=-1, keepdim=True) <= 1e-12 * scale
        v = _orthogonalize(torch.where(closed, _probe(k + 1, d, f), w), done)
        v = v / v.norm(dim=-1, keepdim=True).clamp(min=1e-300)
    return basis


def _orthogonalize(w: Tensor, basis: Tensor) -> Tensor:
    """w minus its projection on the orthonormal columns of ``basis``, twice (Gram-Schmidt)."""
    for _ in range(2):
        w = w - (basis @ (basis.mT @ w.unsqueeze(-1))).squeeze(-1)
    return w


def _probe(k: int, d: int, like: Tensor) -> Tensor:
    """A fixed unit vector ``(..., d)`` made on like's device (no host-to-device copy): a
    positive ramp for k = 0, deterministic pseudo-random values after."""
    i = torch.arange(d, dtype=like.dtype, device=like.device)
    if k == 0:
        v = 1.0 + i / max(d, 1)
    else:
        v = torch.frac(torch.sin(i * 12.9898 + k * 78.233) * 43758.5453) - 0.5
    v = v / v.norm()
    return v.expand(*like.shape[:-2], d)


def directcopy_weight(corr: Tensor, top: Tensor | None, *, eps: float, backend: str = "auto") -> Tensor:
    """W_p of Eq. 18 for power 1, relative mode, ``eps >= min_eig``: ``F / s_max + eps I``.

    Exactly the eigendecomposition path's result (see :attr:`EigMap.has_closed_form`),
    with s_max from :func:`top_eigenpair` warm-started by ``top`` (updated in place;
    None: a cold start). ``F = 0`` gives ``eps I``, as the eigh path does; a NaN in F
    gives a NaN W. Reads corr's lower triangle only; float32 ``(..., d, d)``.
    """
    f = corr.float()
    f = f.tril() + f.tril(-1).mT  # the lower triangle, as eigh reads it
    s_max = _top_eigenpair(f.double(), top, top is None, backend)
    scale = torch.where(s_max > 0, s_max, torch.ones_like(s_max))[..., None, None]
    weight = f / scale.float()
    weight.diagonal(dim1=-2, dim2=-1).add_(eps)
    return weight


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


def newton_schulz_weight(corr: Tensor, top_block: Tensor, eig_map: EigMap, *, iters: int = 15) -> Tensor:
    """W_p of Eq. 18 for power 1/2 (``eig_map.power`` is not read) from matmuls only.

    relative: ``W = (F / s_max)^{1/2} + eps I``; absolute: ``W = F^{1/2} + eps s_max I``,
    with s_max from :func:`top_eigenvalue`. F must be PSD (a correlation is), and in
    relative mode ``eps >= min_eig`` so that the clamp of the map never acts.
    """
    eps, min_eig = eig_map.eps, eig_map.min_eig
    if eig_map.relative and eps < min_eig:
        raise ValueError(f"solver='newton_schulz' needs eps >= min_eig in relative mode, got eps={eps}, min_eig={min_eig}")
    corr = corr.float()
    s_max = top_eigenvalue(corr, top_block)  # (...)
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


class _PendingFlag:
    """The refresh decision of a warm call on CUDA, on its way to pinned host memory."""

    def __init__(self, flag: Tensor) -> None:
        self.host = torch.empty(flag.shape, dtype=flag.dtype, pin_memory=True)
        self.host.copy_(flag, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record(torch.cuda.current_stream(flag.device))

    def read(self) -> bool:
        if not self.event.query():  # recorded a whole call ago: normally already passed
            self.event.synchronize()
        return bool(self.host.any())


# state tensor -> its last call's refresh decision in flight (CUDA only)
_pending_flags: "weakref.WeakKeyDictionary[Tensor, _PendingFlag]" = weakref.WeakKeyDictionary()


def _refresh_requested(state: Tensor, flag: Tensor) -> bool:
    """Whether the state asks for a full eigh. On CUDA the flag of the previous call
    arrives through pinned memory (no wait for the current work); the state's own flag
    is read (a host sync) only when no call of this process left one, e.g. after a
    checkpoint was loaded."""
    pending = _pending_flags.pop(state, None)
    if pending is not None:
        return pending.read()
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
        _pending_flags[state] = _PendingFlag(flag)
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
