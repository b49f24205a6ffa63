"""How W_p = U diag(g(s)) U^T is obtained from F: the solvers, by name, and their state.

- ``"eigh"``: a full eigendecomposition (:func:`fastpred.eigh.symmetric_eigh`, the one
  retry chain), the map, and ``U diag(p) U^T``. Always exact; any map.
- ``"closed_form"`` (DirectCopy): for power 1 in relative mode with ``eps >= min_eig``
  every eigenvalue maps to ``p = s / s_max + eps``, so ``W_p = F / s_max + eps I``
  exactly (docs/design.md, "DirectCopy's closed form"): only the top eigenvalue of F
  is needed (:func:`closed_form_weight`). Cold (no state) it comes from the same
  eigendecomposition as the eigh path, minus the rebuild's product, so it is never
  slower; warm, from a small Krylov space started at the last top eigenvector
  (:func:`top_eigenvalue`, the one top-eigenvalue tracker of fastpred).
- ``"auto"`` (the default): ``"closed_form"`` wherever it holds, else ``"eigh"``.
- ``"newton_schulz"`` and ``"warm"``: experimental, in :mod:`fastpred.experimental`.

A solver that keeps state between calls (the top eigenvector; the warm solver's
basis) keeps it in a tensor owned by the caller and updated in place, so that a module
can checkpoint it: :func:`init_state` makes it, primed for a first F.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import backends
from .eig_map import EigMap
from .eigh import symmetric_eigh, symmetric_eigvalsh

SOLVERS = ("auto", "eigh", "closed_form", "newton_schulz", "warm")
EXPERIMENTAL = ("newton_schulz", "warm")


def choose(solver: str, eig_map: EigMap) -> str:
    """The solver that runs for ``solver`` and ``eig_map``: ``"auto"`` made concrete.

    Raises:
        ValueError: unknown ``solver``, or one that cannot serve this map (the
            closed form outside power 1 / relative / ``eps >= min_eig``; Newton-Schulz
            outside power 0.5); the message names the argument.
    """
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if solver == "auto":
        return "closed_form" if eig_map.has_closed_form else "eigh"
    if solver == "closed_form" and not eig_map.has_closed_form:
        raise ValueError("solver='closed_form' needs power=1, eps_mode='relative' and eps >= min_eig, got "
                         f"power={eig_map.power}, eps_mode={eig_map.eps_mode!r}, eps={eig_map.eps}, "
                         f"min_eig={eig_map.min_eig}")
    if solver == "newton_schulz" and eig_map.power != 0.5:
        raise ValueError(f"solver='newton_schulz' computes power 0.5 only, got power={eig_map.power!r}")
    return solver


def keeps_state(solver: str) -> bool:
    """Whether a (concrete) solver carries state from one call to the next."""
    return solver != "eigh"


def init_state(solver: str, corr: Tensor, *, backend: "str | backends.Backend" = "auto") -> Tensor:
    """The state a concrete ``solver`` keeps between calls, primed for the correlation ``corr``.

    closed_form, newton_schulz: F's top eigenvector ``(..., d)`` (the warm start of
    :func:`top_eigenvalue`), from a full eigendecomposition. warm: ``(..., d + 1, d)``,
    the basis (all zeros: none yet) and a last row whose first entry, 1, asks the
    next call for a full eigh.
    """
    if solver == "warm":
        d = corr.shape[-1]
        state = torch.zeros(*corr.shape[:-2], d + 1, d, dtype=torch.float32, device=corr.device)
        state[..., d, 0] = 1.0  # no basis yet: refresh
        return state
    if solver in ("closed_form", "newton_schulz"):
        top = torch.zeros(corr.shape[:-1], dtype=torch.float32, device=corr.device)
        top_eigenvalue(corr, top, cold=True, backend=backend)
        return top
    raise ValueError(f"solver {solver!r} keeps no state (solvers with state: closed_form, newton_schulz, warm)")


# ------------------------------------------------------------ the top eigenvalue
WARM_STEPS = 8  # Krylov dimension from last call's top eigenvector


def top_eigenvalue(corr: Tensor, top: Tensor | None = None, *, cold: bool = False,
                   backend: "str | backends.Backend" = "auto") -> Tensor:
    """Largest eigenvalue ``(...,)`` (float64) of a symmetric PSD ``corr`` (its lower triangle).

    Cold (``top`` None, or ``cold=True``): exact, the top of a full eigendecomposition
    in float32, as the eigh path (:func:`fastpred.eigh.symmetric_eigvalsh`: the
    eigenvalues alone, when no eigenvector is to be kept). Warm: Rayleigh-Ritz
    on span(v, Fv, ..., F^7 v) with v = ``top`` (the last top eigenvector; normalised
    columns, orthonormalised by one QR in float64), whose small projected matrix goes
    through the same eigensolver chain. The subspace contains v, so the estimate is
    never below v's Rayleigh quotient, whose error is quadratic in v's angle to the top
    eigenvector; the warm start carries the convergence on from call to call. ``top``,
    when given, receives the new top eigenvector. A non-finite F gives NaN (decided on
    the device), not an error.
    """
    f = corr.double()
    f = f.tril() + f.tril(-1).mT  # the lower triangle, as eigh reads it
    return _top_eigenvalue(f, top, cold, backend)


def _top_eigenvalue(f: Tensor, top: Tensor | None, cold: bool, backend: "str | backends.Backend") -> Tensor:
    """:func:`top_eigenvalue` of a float64 symmetric ``f``."""
    if top is None or cold:
        finite = torch.isfinite(f).all(-1).all(-1)  # (...): a NaN F gives NaN, not an EighError
        f = torch.where(finite[..., None, None], f, torch.zeros_like(f))
        if top is None:
            s_top, v_top = symmetric_eigvalsh(f.float(), backend=backend)[..., -1].double(), None
        else:
            s, u = symmetric_eigh(f.float(), backend=backend)
            s_top, v_top = s[..., -1].double(), u[..., -1]
    else:
        d = f.shape[-1]
        warm = top.double()
        norm = warm.norm(dim=-1, keepdim=True)
        start = torch.where(norm > 0, warm / norm.clamp(min=1e-300), _probe(d, f))
        q = _krylov_basis(f, start, min(WARM_STEPS, d))
        projected = q.mT @ f @ q  # (..., k, k)
        finite = torch.isfinite(projected).all(-1).all(-1)
        projected = torch.where(finite[..., None, None], projected, torch.zeros_like(projected))
        s, u = symmetric_eigh(projected, backend=backend, dtype=torch.float64)
        s_top, v_top = s[..., -1], (q @ u[..., -1:]).squeeze(-1)  # the Ritz pair
    if top is not None:
        top.copy_(v_top)
    return torch.where(finite, s_top, torch.full_like(s_top, float("nan")))


def _krylov_basis(f: Tensor, v: Tensor, k: int) -> Tensor:
    """Orthonormal ``(..., d, k)`` basis of span(v, Fv, ..., F^(k-1) v); its first column is v."""
    columns = [v]
    for _ in range(k - 1):
        w = (f @ columns[-1].unsqueeze(-1)).squeeze(-1)
        columns.append(w / w.norm(dim=-1, keepdim=True).clamp(min=1e-300))
    q, _ = torch.linalg.qr(torch.stack(columns, -1))
    return q


def _probe(d: int, like: Tensor) -> Tensor:
    """A fixed positive unit vector ``(..., d)`` made on like's device (no host copy)."""
    v = 1.0 + torch.arange(d, dtype=like.dtype, device=like.device) / max(d, 1)
    return (v / v.norm()).expand(*like.shape[:-2], d)


# ------------------------------------------------------------ DirectCopy's closed form
def closed_form_weight(corr: Tensor, top: Tensor | None, *, eps: float,
                       backend: "str | backends.Backend" = "auto") -> Tensor:
    """W_p of Eq. 18 for power 1, relative mode, ``eps >= min_eig``: ``F / s_max + eps I``.

    Exactly the eigendecomposition path's result (see :attr:`EigMap.has_closed_form`
    and docs/design.md), with s_max from :func:`top_eigenvalue`, warm-started by
    ``top`` (updated in place; None: exact, cold). ``F = 0`` gives ``eps I``, as the
    eigh path does; a NaN in F gives a NaN W. Reads corr's lower triangle only;
    float32 ``(..., d, d)``.
    """
    f = corr.float()
    f = f.tril() + f.tril(-1).mT  # the lower triangle, as eigh reads it
    s_max = _top_eigenvalue(f.double(), top, top is None, backend)
    scale = torch.where(s_max > 0, s_max, torch.ones_like(s_max))[..., None, None]
    weight = f / scale.float()
    weight.diagonal(dim1=-2, dim2=-1).add_(eps)
    return weight
