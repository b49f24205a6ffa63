"""DirectPred as pure functions: the correlation EMA (Eq. 19), the eigenvalue map
and the weight rebuild (Eq. 18).

These are the one implementation of the mathematics in fastpred: the
:class:`~fastpred.DirectPredictor` module (every route: one call or many per step,
one process or DDP, with or without partitions), the trainer and the benchmarks all
call them, and :mod:`fastpred.backends` is reached through them (and the solvers and
the eigensolver, :mod:`fastpred.eigh`, that they call). Each takes a
``backend=`` argument resolved by :mod:`fastpred.backends`: ``"auto"`` picks per
device and step (on CPU the compiled extension where ``bench/`` measured it faster; on
CUDA the choice rests on construction, not on a measurement, as none has been made on
a GPU yet: fused kernels, a cuSOLVER eigensolver without host syncs); ``"torch"`` is
the plain PyTorch reference every other backend is tested against.

Every function accepts leading batch dimensions: ``x`` ``(..., N, d)``, ``corr``
``(..., d, d)``, eigenvalues ``(..., d)``, so several predictors update at once.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import backends, solvers
from .backends import reference
from .eig_map import EigMap
from .eigh import EighError, symmetric_eigh  # noqa: F401  (EighError: re-exported, part of this API)

# |x| above this would overflow x^T x in float32 for any realistic dim: treat as bad data.
MAX_ABS_FEATURE = 1e17


def usable_batch(x: Tensor) -> Tensor:
    """0-dim bool tensor on x's device: every entry of ``x`` is finite and below
    :data:`MAX_ABS_FEATURE` in magnitude. Decided on the device (no host sync)."""
    peak = x.abs().amax() if x.numel() else x.new_zeros(())
    return torch.isfinite(peak) & (peak < MAX_ABS_FEATURE)


def ema_weight(rho: float, *, first: bool | Tensor = False, fold: Tensor | None = None) -> float | Tensor:
    """The blend weight of Eq. 19: ``1 - rho``, ``1`` where ``first`` (the authors set F to
    the first batch correlation), ``0`` where ``fold`` is False (skip the batch).

    Plain floats give a float; tensors (bool, any shape that broadcasts) give a float32
    tensor on their device, so that the decision stays on the device.
    """
    if not isinstance(first, Tensor) and fold is None:
        return 1.0 if first else 1.0 - rho
    device = (first if isinstance(first, Tensor) else fold).device
    weight = torch.where(torch.as_tensor(first, device=device), 1.0, 1.0 - rho)
    if fold is not None:
        weight = torch.where(fold, weight, 0.0)
    return weight.float()


def ema_(state: Tensor, batch: Tensor, weight: float | Tensor) -> Tensor:
    """The EMA blend of Eq. 19 in place, ``state <- state + weight (batch - state)``, with a
    weight from :func:`ema_weight` (1 overwrites, 0 keeps). Used for F, the mean EMA and
    the partition thresholds alike."""
    return reference.ema_(state, batch, weight)


def corr_ema_(
    corr: Tensor,
    x: Tensor,
    rho: float,
    *,
    first: bool | Tensor = False,
    fold: Tensor | None = None,
    mean: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Update the running correlation in place (Eq. 19) from one batch, in one fused step.

    ``corr <- rho * corr + (1 - rho) * x^T x / N``, or ``corr <- x^T x / N`` when
    ``first`` (the authors' trainer sets F to the first batch correlation rather
    than blending it with zeros). F is a correlation, not a covariance: x is not
    centred (the paper reports centring hurts). The per-sample outer products are
    never formed. ``mean``, when given, receives the same EMA of the batch mean
    (for ``zero_mean``: the covariance is ``corr - mean mean^T``).

    Args:
        corr: float32 ``(..., d, d)``, updated in place.
        x: ``(..., N, d)`` float32, bfloat16 or float16; accumulated in float32.
        rho: EMA coefficient in [0, 1).
        first: overwrite instead of blending; a bool, or a 0-dim bool tensor decided
            on the device.
        fold: optional 0-dim bool tensor: where False the batch is skipped (``corr``
            and ``mean`` unchanged, even if ``x`` holds NaN), without a host sync.
        mean: optional float32 ``(..., d)`` running mean, updated in place.
        backend: see :mod:`fastpred.backends`.

    Returns:
        ``corr``.
    """
    weight = ema_weight(rho, first=first, fold=fold)
    if fold is not None:
        x = torch.where(fold, x, torch.zeros((), dtype=x.dtype, device=x.device))  # a skipped NaN must not reach 0 * NaN
    impl = backends.resolve(backend, corr.device)
    return impl.corr_ema_(corr, x, weight, mean)


def add_moments_(
    gram: Tensor, total: Tensor, count: Tensor, x: Tensor, masks: Tensor | None = None, *, backend: str = "auto"
) -> None:
    """Add a batch's moments to running sums, the statistics of Eq. 19 before the EMA.

    ``gram += x^T x``, ``total += sum_n x_n``, ``count += N``; with ``masks`` (0/1,
    ``(m, N)``) once per row j over the samples it selects: ``gram[j] += x^T diag(masks[j]) x``.
    Sums over several calls equal one call on their concatenation, so the batch
    correlation of a step made of several calls is ``gram / count`` (the authors fold
    both views of a step as one batch).

    Args:
        gram: float32 ``(d, d)``, or ``(m, d, d)`` with masks; updated in place.
        total: float32 ``(d,)`` or ``(m, d)``; updated in place.
        count: float32 ``()`` or ``(m,)``; updated in place.
        x: ``(N, d)``, any float dtype (accumulated in float32).
        masks: optional ``(m, N)`` 0/1 float tensor.
        backend: see :mod:`fastpred.backends`.
    """
    impl = backends.resolve(backend, gram.device)
    x = x.float()
    if masks is None:
        gram.add_(impl.gram(x))
        total.add_(x.sum(0))
        count.add_(x.shape[0])
        return
    masks = masks.float()
    gram.add_(impl.gram(masks.unsqueeze(-1) * x))  # (m, d, d); masks are 0/1 so squares are harmless
    total.add_(masks @ x)
    count.add_(masks.sum(-1))


def eig_map(
    s: Tensor,
    *,
    eps: float = 0.1,
    power: float = 0.5,
    eps_mode: str = "relative",
    min_eig: float = 1e-4,
    backend: str = "auto",
) -> Tensor:
    """Map eigenvalues s of F to eigenvalues p of W_p (Eq. 18 and the authors' form).

    ``eps_mode="relative"`` (default; the authors' ``boost_scale``, which produced
    the paper's tables): ``p = max((max(s,0)/max(s)) ** power + eps, min_eig)``;
    ``eps_mode="absolute"`` (Eq. 18 as printed): ``p = max(s,0) ** power + eps * max(s)``.
    ``power=0.5`` is DirectPred, ``power=1`` DirectCopy-style; F all zeros and the
    checks on the arguments: see :class:`fastpred.eig_map.EigMap`.

    The map is elementwise and the same on every device: ``backend`` is accepted
    for a uniform signature and only checked.
    """
    backends.check_name(backend)
    return EigMap(eps=eps, power=power, eps_mode=eps_mode, min_eig=min_eig)(s)


def directpred_weight(
    corr: Tensor,
    *,
    eps: float = 0.1,
    power: float = 0.5,
    eps_mode: str = "relative",
    min_eig: float = 1e-4,
    backend: str = "auto",
    solver: str = "eigh",
    solver_state: Tensor | None = None,
) -> Tensor:
    """The DirectPred predictor for a correlation matrix: ``W = U diag(p) U^T`` (Eq. 18).

    ``corr = U diag(s) U^T`` (only its lower triangle is read), ``p = eig_map(s)``.
    The result is symmetric and shares corr's eigenvectors. When the map is known
    to be non-negative it is formed as ``V V^T`` with ``V = U diag(sqrt p)``.

    Args:
        corr: symmetric ``(..., d, d)``.
        eps, power, eps_mode, min_eig: see :func:`eig_map`.
        backend: see :mod:`fastpred.backends`.
        solver: ``"eigh"`` (default: a full eigendecomposition; for power 1 in
            relative mode with ``eps >= min_eig``, the exact closed form
            ``F / s_max + eps I`` instead, see :func:`fastpred.solvers.directcopy_weight`),
            ``"newton_schulz"`` (power 0.5 only; matmuls only) or ``"warm"`` (refines
            the previous basis, full eigh when F moved too far); see :mod:`fastpred.solvers`.
        solver_state: the state the solver keeps between calls, from
            :func:`fastpred.solvers.init_state`, updated in place (for ``"eigh"``:
            the closed form's warm start, optional).

    Returns:
        float32 ``(..., d, d)``.

    Raises:
        EighError: the eigendecomposition failed even in float64 (see
            :func:`symmetric_eigh`).
    """
    eig_map = EigMap(eps=eps, power=power, eps_mode=eps_mode, min_eig=min_eig)
    return solve_weight(corr, eig_map, backend=backend, solver=solver, solver_state=solver_state)


def solve_weight(
    corr: Tensor,
    eig_map: EigMap,
    *,
    backend: str = "auto",
    solver: str = "eigh",
    solver_state: Tensor | None = None,
) -> Tensor:
    """:func:`directpred_weight` for a map already made (what ``DirectPredictor`` holds)."""
    check_solver(solver, eig_map.power)
    if solver == "newton_schulz":
        return solvers.newton_schulz_weight(corr, solver_state, eig_map)
    if solver == "warm":
        weight, _ = solvers.warm_eigh_weight(corr, solver_state, eig_map, backend=backend)
        return weight
    if eig_map.has_closed_form:
        # DirectCopy: W = F / s_max + eps I exactly; no eigendecomposition (DESIGN.md section 5).
        return solvers.directcopy_weight(corr, solver_state, eps=eig_map.eps, backend=backend)
    s, u = symmetric_eigh(corr, backend=backend)
    return backends.resolve(backend, corr.device).rebuild(s, u, eig_map)


def check_solver(solver: str, power: float) -> None:
    """Raise ValueError naming ``solver`` when it is unknown or cannot serve ``power``."""
    if solver not in solvers.SOLVERS:
        raise ValueError(f"solver must be one of {solvers.SOLVERS}, got {solver!r}")
    if solver == "newton_schulz" and power != 0.5:
        raise ValueError(f"solver='newton_schulz' computes power 0.5 only, got power={power!r}")


def covariance(corr: Tensor, mean: Tensor) -> Tensor:
    """``corr - mean mean^T``: the covariance behind a correlation and its mean."""
    return corr - mean.unsqueeze(-1) * mean.unsqueeze(-2)
