"""DirectPred as pure functions: the statistics of Eq. 19 (batch moments, the fold into
the running F), the eigenvalue map and the weight rebuild (Eq. 18).

These are the one implementation of the mathematics in fastpred: the
:class:`~fastpred.DirectPredictor` module (:mod:`fastpred.statistics` for the
statistics, :mod:`fastpred.schedule` for the rebuild), the trainer and the benchmarks
all call them, and :mod:`fastpred.backends` is reached through them (and the solvers
and the eigensolver, :mod:`fastpred.eigh`, that they call). Each takes a ``backend=``
argument: a name resolved by :mod:`fastpred.backends` (``"auto"`` picks per device and
step: on CPU the compiled extension where ``bench/`` measured it faster; on CUDA the
choice rests on construction, not on a measurement, as none has been made on a GPU
yet; ``"torch"`` is the plain PyTorch reference every other backend is tested
against), or a :class:`~fastpred.backends.Backend` already resolved for the device.

Every function accepts leading batch dimensions: ``x`` ``(..., N, d)``, ``corr``
``(..., d, d)``, eigenvalues ``(..., d)``, per-predictor ``first``/``fold`` ``(...)``,
so several predictors update at once. Statistics are computed in float32 whatever
dtype the features have and whatever autocast region the call is made in.
Arguments are checked before anything is written: a ValueError or TypeError names
the argument and what it accepts.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor

from . import backends, solvers
from .backends import Backend, reference
from .eig_map import EigMap
from .eigh import EighError, symmetric_eigh  # noqa: F401  (EighError: re-exported, part of this API)

# ------------------------------------------------------------------ checks
def check_rho(rho: float) -> float:
    """``rho`` as a float; ValueError naming it unless it is a real number in [0, 1)."""
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not (0 <= rho < 1):
        raise ValueError(f"rho must be a real number in [0, 1), got {rho!r}")
    return float(rho)


def _check_matrix(name: str, a: Tensor) -> None:
    if not isinstance(a, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(a).__name__}")
    if a.dim() < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"{name} must be a square matrix or a stack of them, shape (..., d, d), got {tuple(a.shape)}")
    if not a.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {a.dtype}")


def _check_state(name: str, state: Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(state, Tensor) or state.dtype != torch.float32:
        got = state.dtype if isinstance(state, Tensor) else type(state).__name__
        raise TypeError(f"{name} must be a float32 tensor (statistics are kept in float32), got {got}")
    if tuple(state.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(state.shape)}")


def _check_features(x: Tensor, d: int, lead: tuple[int, ...]) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point tensor (..., N, d), got {got}")
    if x.dim() < 2 or x.shape[-1] != d or tuple(x.shape[:-2]) != tuple(lead):
        raise ValueError(f"x must have shape {(*lead, 'N', d)} to match the statistics, got {tuple(x.shape)}")


def float32_statistics(device: torch.device) -> AbstractContextManager:
    """Autocast off for the statistics: x^T x of fp16 features overflows (|x| ~ 3,
    N = 8192 already exceeds fp16's 65504), and bf16 keeps 3 significant digits.
    (Nothing to switch off, and nothing paid, outside an autocast region.)"""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()


# ------------------------------------------------------------------ Eq. 19
def ema_weight(rho: float, *, first: bool | Tensor = False, fold: bool | Tensor | None = None) -> float | Tensor:
    """The blend weight of Eq. 19: ``1 - rho``, ``1`` where ``first`` (the authors set F to
    the first batch correlation), ``0`` where ``fold`` is False (skip the batch).

    Plain bools give a float; tensors (bool, one entry per predictor: any shape, they
    broadcast against each other) give a float32 tensor on their device, so that the
    decision stays on the device.

    Raises:
        ValueError: ``rho`` outside [0, 1); ``first`` and ``fold`` of shapes that do
            not broadcast.
    """
    rho = check_rho(rho)
    if not isinstance(first, Tensor) and not isinstance(fold, Tensor):
        if fold is not None and not fold:
            return 0.0
        return 1.0 if first else 1.0 - rho
    device = (first if isinstance(first, Tensor) else fold).device
    first_t = torch.as_tensor(first, device=device)
    if fold is None:
        fold = True
    fold_t = torch.as_tensor(fold, device=device)
    try:
        torch.broadcast_shapes(first_t.shape, fold_t.shape)
    except RuntimeError:
        raise ValueError(f"first {tuple(first_t.shape)} and fold {tuple(fold_t.shape)} must broadcast "
                         "(one entry per predictor)") from None
    weight = torch.where(first_t, 1.0, 1.0 - rho)
    return torch.where(fold_t, weight, 0.0).float()


def ema_(state: Tensor, batch: Tensor, weight: float | Tensor) -> Tensor:
    """The EMA blend of Eq. 19 in place, ``state <- state + weight (batch - state)``, with a
    weight from :func:`ema_weight` (1 overwrites, 0 keeps). Used for F, the mean EMA and
    the partition thresholds alike.

    A tensor ``weight`` holds one entry per predictor: its shape is a prefix of
    ``state``'s (``(B,)`` for ``state`` ``(B, d, d)``), or broadcasts against it.
    """
    if isinstance(weight, Tensor) and weight.dim():
        if tuple(weight.shape) == tuple(state.shape[: weight.dim()]):
            weight = weight.reshape(*weight.shape, *(1,) * (state.dim() - weight.dim()))
        else:
            try:
                torch.broadcast_shapes(weight.shape, state.shape)
            except RuntimeError:
                raise ValueError(f"weight {tuple(weight.shape)} must hold one entry per predictor of state "
                                 f"{tuple(state.shape)} (a prefix of its shape)") from None
    if tuple(torch.broadcast_shapes(batch.shape, state.shape)) != tuple(state.shape):
        raise ValueError(f"batch {tuple(batch.shape)} must broadcast to state {tuple(state.shape)}")
    return reference.ema_(state, batch, weight)


def corr_ema_(
    corr: Tensor,
    x: Tensor,
    rho: float,
    *,
    first: bool | Tensor = False,
    fold: Tensor | None = None,
    mean: Tensor | None = None,
    backend: "str | Backend" = "auto",
) -> Tensor:
    """Update the running correlation in place (Eq. 19) from one batch, in one fused step.

    ``corr <- rho * corr + (1 - rho) * x^T x / N``, or ``corr <- x^T x / N`` when
    ``first`` (the authors' trainer sets F to the first batch correlation rather
    than blending it with zeros). F is a correlation, not a covariance: x is not
    centred (the paper reports centring hurts). The per-sample outer products are
    never formed. ``mean``, when given, receives the same EMA of the batch mean
    (for ``zero_mean``: the covariance is ``corr - mean mean^T``). The fused form of
    :func:`add_moments_` followed by :func:`fold_moments_` for a step of one call.

    Args:
        corr: float32 ``(..., d, d)``, updated in place.
        x: ``(..., N, d)`` float32, bfloat16 or float16, N >= 1; accumulated in float32.
        rho: EMA coefficient in [0, 1).
        first: overwrite instead of blending; a bool, or a bool tensor ``(...)``
            decided on the device.
        fold: optional bool tensor ``(...)``: where False the batch is skipped
            (``corr`` and ``mean`` unchanged, even if ``x`` holds NaN), without a host sync.
        mean: optional float32 ``(..., d)`` running mean, updated in place.
        backend: see :mod:`fastpred.backends`.

    Returns:
        ``corr``.

    Raises:
        ValueError, TypeError: a shape, dtype or ``rho`` out of range (named).
    """
    _check_matrix("corr", corr)
    lead, d = tuple(corr.shape[:-2]), corr.shape[-1]
    _check_state("corr", corr, (*lead, d, d))
    _check_features(x, d, lead)
    if x.shape[-2] == 0:
        raise ValueError("x must hold at least one sample (N >= 1); an empty batch has no correlation")
    if mean is not None:
        _check_state("mean", mean, (*lead, d))
    weight = ema_weight(rho, first=first, fold=fold)
    if isinstance(weight, Tensor) and weight.dim():
        weight = weight.reshape(*weight.shape, *(1,) * (len(lead) - weight.dim()))
    if fold is not None:
        keep = torch.as_tensor(fold, device=x.device)  # a skipped NaN must not reach 0 * NaN
        x = torch.where(keep.reshape(*keep.shape, 1, 1), x, torch.zeros((), dtype=x.dtype, device=x.device))
    impl = backends.resolve(backend, corr.device)
    with float32_statistics(corr.device):
        if isinstance(weight, Tensor) and weight.dim():  # per-predictor weights: the reference blends them
            xf = x.float()
            ema_(corr, reference.gram(xf) / x.shape[-2], weight)
            if mean is not None:
                ema_(mean, xf.mean(-2), weight)
            return corr
        return impl.corr_ema_(corr, x, weight, mean)


def add_moments_(
    gram: Tensor, total: Tensor, count: Tensor, x: Tensor, masks: Tensor | None = None, *,
    backend: "str | Backend" = "auto",
) -> None:
    """Add a batch's moments to running sums, the statistics of Eq. 19 before the EMA.

    ``gram += x^T x``, ``total += sum_n x_n``, ``count += N``; with ``masks`` (0/1,
    ``(..., m, N)``) once per row j over the samples it selects:
    ``gram[..., j, :, :] += x^T diag(masks[..., j, :]) x``. Sums over several calls
    equal one call on their concatenation, so the batch correlation of a step made of
    several calls is ``gram / count`` (the authors fold both views of a step as one
    batch): :func:`fold_moments_`.

    Args:
        gram: float32 ``(..., d, d)``, or ``(..., m, d, d)`` with masks; updated in place.
        total: float32 ``(..., d)`` or ``(..., m, d)``; updated in place.
        count: float32 ``(...)`` or ``(..., m)``; updated in place.
        x: ``(..., N, d)``, any float dtype (accumulated in float32, autocast or not).
        masks: optional ``(..., m, N)`` 0/1 float tensor.
        backend: see :mod:`fastpred.backends`.

    Raises:
        ValueError, TypeError: shapes that do not match (named), sums not float32.
    """
    _check_matrix("gram", gram)
    d = gram.shape[-1]
    stack = tuple(gram.shape[:-2])
    lead = stack if masks is None else stack[:-1]
    if masks is not None:
        if not isinstance(masks, Tensor) or tuple(masks.shape[:-1]) != stack or masks.shape[-1] != x.shape[-2]:
            got = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
            raise ValueError(f"masks must have shape {(*stack, x.shape[-2])} (one row per sum of gram), got {got}")
    _check_state("gram", gram, (*stack, d, d))
    _check_state("total", total, (*stack, d))
    _check_state("count", count, stack)
    _check_features(x, d, lead)
    impl = backends.resolve(backend, gram.device)
    with float32_statistics(gram.device):
        x = x.float()
        if masks is None:
            if impl.gram is reference.gram:  # the library GEMM accumulates in place: no temporary, no extra pass
                gram.addmm_(x.mT, x) if x.dim() == 2 else gram.baddbmm_(x.mT, x)
            else:
                gram.add_(impl.gram(x))
            total.add_(x.sum(-2))
            count.add_(x.shape[-2])
            return
        masks = masks.float()
        gram.add_(impl.gram(masks.unsqueeze(-1) * x.unsqueeze(-3)))  # (..., m, d, d); 0/1 masks: squares harmless
        total.add_(masks @ x)
        count.add_(masks.sum(-1))


def fold_moments_(
    corr: Tensor,
    gram: Tensor,
    total: Tensor,
    count: Tensor,
    rho: float,
    *,
    first: bool | Tensor = False,
    mean: Tensor | None = None,
    backend: "str | Backend" = "auto",
) -> tuple[Tensor, Tensor]:
    """Fold one step's summed moments (:func:`add_moments_`) into the running statistics
    (Eq. 19), judged by those moments, in one pass over d x d.

    The step is *usable* when every entry of ``gram``, ``total`` and ``count`` is finite:
    a non-finite feature (its square sits on the diagonal of x^T x) or an x^T x that
    overflowed float32 (which no threshold on the features predicts for a large N)
    spoils it, and then no statistic changes. Otherwise ``corr <- EMA(corr, gram / count)``
    and, when given, ``mean <- EMA(mean, total / count)``, with the weight of
    :func:`ema_weight`; an F whose count is 0 (a half-space that received no sample)
    keeps its value. Decided on the device (no host sync). Batched like the sums: one
    decision for the whole stack, one weight per F.

    Args:
        corr: float32 ``(..., d, d)``, updated in place.
        gram, total, count: float32 ``(..., d, d)``, ``(..., d)``, ``(...)``: the sums.
        rho: EMA coefficient in [0, 1).
        first: overwrite instead of blending; a bool, or a bool tensor ``(...)``.
        mean: optional float32 ``(..., d)`` running mean, updated in place.
        backend: see :mod:`fastpred.backends` (``fold_``: the torch reference is the spec;
            the extension on CPU and a Triton kernel on CUDA fuse it into one pass).

    Returns:
        ``(weight, usable)``: the float32 weight per F ``(...)`` (0 where kept) and the
        0-dim bool that says whether the step was folded.

    Raises:
        ValueError, TypeError: shapes that do not match (named), sums not float32,
            ``rho`` out of range.
    """
    rho = check_rho(rho)
    _check_matrix("corr", corr)
    stack, d = tuple(corr.shape[:-2]), corr.shape[-1]
    _check_state("corr", corr, (*stack, d, d))
    _check_state("gram", gram, (*stack, d, d))
    _check_state("total", total, (*stack, d))
    _check_state("count", count, stack)
    if mean is not None:
        _check_state("mean", mean, (*stack, d))
    first_t = torch.as_tensor(first, device=corr.device)
    if first_t.dtype != torch.bool or tuple(torch.broadcast_shapes(first_t.shape, stack)) != stack:
        raise ValueError(f"first must be a bool or a bool tensor broadcasting to {stack}, got {first!r}")
    first_t = first_t.expand(stack)
    impl = backends.resolve(backend, corr.device)
    with float32_statistics(corr.device):
        return impl.fold_(corr, gram, total, count, first_t, rho, mean)


def install_weight_(weight: Tensor, new: Tensor, *, backend: "str | Backend" = "auto") -> Tensor:
    """The install guard of a rebuild: ``weight <- new`` where every entry of ``new`` is
    finite, else ``weight`` is kept whole (a GPU eigensolver reports a failure later, as
    NaN: so no host sync is needed). One pass: the judgement and the copy fused on the
    extension (CPU) and in a Triton kernel (CUDA); the torch reference is the spec.

    Args:
        weight: ``(..., d, d)`` tensor written in place (W_p; its data, under no_grad).
        new: the rebuilt W_p, same shape and device; cast to ``weight``'s dtype.
        backend: see :mod:`fastpred.backends`.

    Returns:
        The 0-dim bool tensor "installed", on ``weight``'s device.

    Raises:
        ValueError, TypeError: shapes or devices that differ, a non-float tensor.
    """
    for name, t in (("weight", weight), ("new", new)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a floating-point tensor, got {got}")
    if new.shape != weight.shape or new.device != weight.device:
        raise ValueError(f"new {tuple(new.shape)} on {new.device} must match weight {tuple(weight.shape)} "
                         f"on {weight.device}")
    return backends.resolve(backend, weight.device).install_(weight, new)


# ------------------------------------------------------------------ Eq. 18
def eig_map(
    s: Tensor,
    *,
    eps: float = 0.1,
    power: float = 0.5,
    eps_mode: str = "relative",
    min_eig: float = 1e-4,
    backend: "str | Backend" = "auto",
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
    backend: "str | Backend" = "auto",
    solver: str = "auto",
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
        solver: ``"auto"`` (default: DirectCopy's exact closed form ``F / s_max + eps I``
            where it holds, power 1 in relative mode with ``eps >= min_eig``; else
            ``"eigh"``), ``"eigh"`` (always a full eigendecomposition),
            ``"closed_form"``, or the experimental ``"newton_schulz"`` / ``"warm"``;
            see :mod:`fastpred.solvers`.
        solver_state: the state the solver keeps between calls, from
            :func:`fastpred.solvers.init_state`, updated in place. The closed form
            without it is exact and cold (never slower than ``"eigh"``); with it,
            warm (a few matrix-vector products).

    Returns:
        float32 ``(..., d, d)``.

    Raises:
        ValueError, TypeError: ``corr`` not ``(..., d, d)``, or a setting out of range.
        EighError: the eigendecomposition failed even in float64 (see
            :func:`symmetric_eigh`).
    """
    eig_map = EigMap(eps=eps, power=power, eps_mode=eps_mode, min_eig=min_eig)
    return solve_weight(corr, eig_map, backend=backend, solver=solver, solver_state=solver_state)


def solve_weight(
    corr: Tensor,
    eig_map: EigMap,
    *,
    backend: "str | Backend" = "auto",
    solver: str = "auto",
    solver_state: Tensor | None = None,
) -> Tensor:
    """:func:`directpred_weight` for a map already made (what ``DirectPredictor`` holds)."""
    _check_matrix("corr", corr)
    solver = solvers.choose(solver, eig_map)
    if solver_state is None and solver in ("newton_schulz", "warm"):
        raise ValueError(f"solver={solver!r} needs solver_state (from fastpred.solvers.init_state)")
    if solver == "newton_schulz":
        from .experimental import newton_schulz_weight

        return newton_schulz_weight(corr, solver_state, eig_map, backend=backend)
    if solver == "warm":
        from .experimental import warm_eigh_weight

        return warm_eigh_weight(corr, solver_state, eig_map, backend=backend)[0]
    if solver == "closed_form":  # DirectCopy: W = F / s_max + eps I exactly (docs/design.md)
        return solvers.closed_form_weight(corr, solver_state, eps=eig_map.eps, backend=backend)
    s, u = symmetric_eigh(corr, backend=backend)
    return backends.resolve(backend, corr.device).rebuild(s, u, eig_map)


def covariance(corr: Tensor, mean: Tensor) -> Tensor:
    """``corr - mean mean^T``: the covariance behind a correlation and its mean."""
    return corr - mean.unsqueeze(-1) * mean.unsqueeze(-2)
