"""DirectPredictor: the DirectPred linear predictor as a drop-in ``nn.Module``."""
from __future__ import annotations

import math
import warnings
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as nnf
from torch import Tensor, nn

from . import backends, functional, solvers
from .async_rebuild import PendingRebuild, start_rebuild
from .eig_map import EigMap
from .eigh import EighError
from .partitions import batch_thresholds, half_space_masks, partitioned_linear, project, random_hyperplanes

# State that stays float32 whatever dtype the module is cast to (.half(), .double(), ...).
_FLOAT32_STATE = ("corr", "mean", "planes", "thresholds", "solver_state")


class _Moments(NamedTuple):
    """Views into the per-step accumulator: the sums of every training call since the last fold."""

    gram: Tensor  # (d, d) or (2k, d, d): sum of x x^T per F
    total: Tensor  # (d,) or (2k, d): sum of x per F
    count: Tensor  # () or (2k,): samples per F
    projections: Tensor  # (k,): sum of the projections on the hyperplanes (partitions only)
    bad: Tensor  # (): calls with non-finite features


class DirectPredictor(nn.Module):
    """Linear, bias-free predictor W_p set from the running correlation of its inputs.

    DirectPred (Tian, Chen & Ganguli, ICML 2021, Sec. 4): F is an EMA of the batch
    correlation of the predictor's inputs (Eq. 19), ``F = U diag(s) U^T``, and
    ``W_p = U diag(p) U^T`` with ``p`` from the eigenvalue map (Eq. 18). W_p is never
    trained by gradient when ``freq == 1``; with ``freq > 1`` it is re-set every
    ``freq`` steps and trained by the optimizer in between (Table 8).

    **Steps.** A step folds a batch into F and, every ``freq`` steps, re-sets W_p from
    F; the W_p used at step t+1 already includes batch t, as in the authors' trainer.
    After :meth:`attach` (``pred.attach(optimizer)``) a step is an optimizer step: every
    training-mode call between two ``optimizer.step()`` only adds its batch's moments
    (x^T x, sum of x, count) to an accumulator, and the step folds them as ONE batch,
    which is what the authors do with both views (so ``p1 = pred(z1); p2 = pred(z2)``
    equals ``pred(torch.cat([z1, z2]))``, and k micro-batches of gradient accumulation
    equal one step on their union). Without :meth:`attach` each training-mode call is
    one step. Either way a call uses a copy of W_p, so any number of calls per step
    back-propagate correctly. Eval mode only predicts.

    Args:
        dim: feature dimension d (W_p is d x d).
        rho: EMA coefficient of Eq. 19, in [0, 1). The paper's best STL-10 value is 0.3.
        eps: the eigenvalue boost of Eq. 18 (0.1 in the paper's best runs).
        freq: rebuild every ``freq`` steps (1 = DirectPred; 5 in Table 8).
        power: p ~ s ** power; 0.5 is DirectPred, 1 is DirectCopy-style.
        eps_mode: ``"relative"`` (default; the authors' code, which produced the
            paper's tables): ``p = max((max(s,0)/max s) ** power + eps, min_eig)``;
            ``"absolute"`` (Eq. 18 as printed): ``p = max(s,0) ** power + eps max s``.
        zero_mean: use the covariance ``F - m m^T`` (m an EMA of the mean) instead of
            the correlation. Off by default: the paper reports centring hurts.
        min_eig: lower clamp of p in relative mode (the authors' 1e-4).
        sync: under ``torch.distributed``, take the batch statistics over all ranks
            (one all-reduce per step) so every rank holds the same F and W_p. With
            ``sync=False`` each rank keeps its own F.
        backend: see :mod:`fastpred.backends` (``"auto"``, ``"torch"``, ...).
        partitions: k > 0 gives the paper's feature-dependent W_p (Sec. 4, "random
            partitions"; 78.20 on STL-10 with k = 6; see :mod:`fastpred.partitions`):
            k fixed random hyperplanes split each call's batch at the batch mean of
            each projection; each half keeps its own F, hence 2k predictors, and a
            sample's prediction averages the k predictors of the halves it falls in
            (the authors' ``partition`` mode, for any dim). One difference from their
            code, which rebuilt every step from statistics that already included the
            current batch: here the rebuild follows ``freq`` and the order above, like
            the plain predictor. A half that receives no sample keeps its F (they
            blended in zeros). Per-view calls split each view at its own mean.
        solver: how W_p is obtained from F: ``"eigh"`` (default, exact),
            ``"newton_schulz"`` (power 0.5; matmuls only, no host sync: for GPUs) or
            ``"warm"`` (refines last rebuild's eigenbasis; pays off only for a slow
            EMA, rho >= 0.9). See :mod:`fastpred.solvers`.
        async_rebuild: compute the rebuild for step t+1 right after step t's fold, on
            a side CUDA stream or a worker thread (:mod:`fastpred.async_rebuild`), so
            that it overlaps other work; it is swapped in at the next training call.
            Bit-identical to the synchronous path.

    Attributes:
        weight: ``nn.Parameter`` (d, d), W_p — (2k, d, d) with partitions, rows
            2i / 2i+1 the predictors of the upper / lower half of hyperplane i.
            ``requires_grad`` only when ``freq > 1``.
        corr: buffer, F, float32 (also after ``.half()`` etc.), shaped like ``weight``.
        mean: buffer (d,) or (2k, d): the EMA of the mean (used when ``zero_mean``).
        planes, thresholds: buffers (d, k) and (k,): the random hyperplanes and the
            EMA of the projections' batch means (the split used in eval mode).
        folded: int64 buffer (or (2k,)): batches folded into each F.
        num_updates: int64 buffer, steps taken (skipped ones included).
        num_skipped: int64 buffer, steps whose statistics were skipped (non-finite x).
        num_eigh_failures: int64 buffer, rebuilds that kept the previous W_p.
        eig_map: the map's settings (eps, power, eps_mode, min_eig), one
            :class:`~fastpred.eig_map.EigMap`.

    Robustness: a step with non-finite values (in any of its calls) leaves F unchanged
    (y is still returned), is counted and, on CPU, warned about at once; on GPU the
    skip is decided on the device without a host sync and the warning comes with the
    next ``state_dict()``. A batch of N = 0 samples changes no statistics. A failed
    eigendecomposition is retried in float64, then in float64 with a tiny diagonal
    jitter; if that fails too (or, on GPU, the solver reports NaN), W_p keeps its
    previous value and ``num_eigh_failures`` counts it (decided on the device on GPU).

    Example:
        >>> pred = DirectPredictor(128)
        >>> opt = torch.optim.SGD(pred.parameters(), lr=0.1)
        >>> handle = pred.attach(opt)   # one fold per optimizer step
        >>> z1, z2 = torch.randn(64, 128), torch.randn(64, 128)
        >>> p1, p2 = pred(z1), pred(z2)  # per-view calls: folded together at opt.step()
    """

    def __init__(
        self,
        dim: int,
        *,
        rho: float = 0.3,
        eps: float = 0.1,
        freq: int = 1,
        power: float = 0.5,
        eps_mode: str = "relative",
        zero_mean: bool = False,
        min_eig: float = 1e-4,
        sync: bool = True,
        backend: str = "auto",
        partitions: int = 0,
        async_rebuild: bool = False,
        solver: str = "eigh",
    ) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 <= rho < 1:
            raise ValueError(f"rho must be a number in [0, 1), got {rho!r}")
        if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
            raise ValueError(f"freq must be an integer >= 1, got {freq!r}")
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 0:
            raise ValueError(f"partitions must be an integer >= 0, got {partitions!r}")
        self.eig_map = EigMap(eps=eps, power=power, eps_mode=eps_mode, min_eig=min_eig)
        functional.check_solver(solver, power)
        backends.check_name(backend)
        self.dim, self.rho, self.freq = dim, float(rho), freq
        self.zero_mean, self.sync, self.backend = bool(zero_mean), bool(sync), backend
        self.partitions, self.async_rebuild, self.solver = partitions, bool(async_rebuild), solver

        stack = (2 * partitions,) if partitions else ()  # one F and W_p per half-space
        # nn.Linear's initialisation, as the authors' predictor: W_p before the first rebuild.
        weight = torch.empty(*stack, dim, dim)
        for w in weight.view(-1, dim, dim):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.weight = nn.Parameter(weight, requires_grad=freq > 1)
        self.register_buffer("corr", torch.zeros(*stack, dim, dim))
        self.register_buffer("mean", torch.zeros(*stack, dim))
        self.register_buffer("folded", torch.zeros(stack, dtype=torch.int64))
        if partitions:
            self.register_buffer("planes", random_hyperplanes(dim, partitions))
            self.register_buffer("thresholds", torch.zeros(partitions))
        self._keeps_solver_state = solver != "eigh" or self.eig_map.has_closed_form  # DirectCopy's warm start
        if self._keeps_solver_state:
            # What the solver carries from one rebuild to the next; primed at the first one.
            self.register_buffer("solver_state", torch.zeros_like(solvers.init_state(solver, self.corr)))
            self._solver_primed = False
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))
        self.register_buffer("num_skipped", torch.zeros((), dtype=torch.int64))
        self.register_buffer("num_eigh_failures", torch.zeros((), dtype=torch.int64))
        # The per-step accumulator: one flat tensor, so one all-reduce under DDP. Not a
        # buffer: DDP broadcasts buffers from rank 0 at every forward, which would overwrite
        # each rank's own sums between the micro-batches of a step; and a checkpoint is
        # taken between steps. It follows device moves through _apply.
        halves = max(1, 2 * partitions)
        self._moment_sizes = (halves * dim * dim, halves * dim, halves, partitions, 1)
        self._moments = torch.zeros(sum(self._moment_sizes))
        # Host-side state, so that the hot path never reads the device.
        self._steps = 0  # mirror of num_updates
        self._skips_warned = 0
        self._attached = False  # steps are optimizer steps (attach) rather than calls
        self._rebuild_owed = False  # a rebuild is due before the next training call
        self._pending: PendingRebuild | None = None
        self._load_rejected = False
        self.register_load_state_dict_post_hook(_after_load)

    # The map's settings, readable like every other constructor argument (kept in eig_map).
    eps = property(lambda self: self.eig_map.eps)
    power = property(lambda self: self.eig_map.power)
    eps_mode = property(lambda self: self.eig_map.eps_mode)
    min_eig = property(lambda self: self.eig_map.min_eig)

    def extra_repr(self) -> str:
        extra = f", partitions={self.partitions}" if self.partitions else ""
        extra += ", async_rebuild=True" if self.async_rebuild else ""
        extra += f", solver={self.solver!r}" if self.solver != "eigh" else ""
        return (
            f"dim={self.dim}, rho={self.rho}, eps={self.eps}, freq={self.freq}, power={self.power}, "
            f"eps_mode={self.eps_mode!r}, zero_mean={self.zero_mean}, backend={self.backend!r}{extra}"
        )

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        """Predict ``x @ W_p^T``; in training mode also record x for the step (see class doc).

        Args:
            x: ``(N, dim)`` floating point, on the module's device (N may be 0).
        """
        self._check_input(x)
        if self.training and (not self._attached or self.async_rebuild):
            self._bring_weight_up_to_date()
        # With freq == 1 W_p is set, never trained: no gradient reaches it. A copy either
        # way: the graph saves it, so a later in-place rebuild cannot invalidate this call.
        weight = self.weight if self.freq > 1 else self.weight.detach()
        dtype = self.weight.dtype if torch.is_autocast_enabled(x.device.type) else x.dtype
        weight = weight.to(dtype, copy=True)
        masks = projections = None
        if self.partitions:
            projections = project(x.detach(), self.planes)  # (N, k)
            thresholds = batch_thresholds(projections, self._synced()) if self.training else self.thresholds
            masks = half_space_masks(projections, thresholds)  # (2k, N)
            y = partitioned_linear(x, weight, masks)
        else:
            y = nnf.linear(x, weight)
        if self.training:
            if self._attached:
                self._accumulate(x.detach(), masks, projections)
            else:
                self._step_with_one_call(x.detach(), masks, projections)
        return y

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor (float32, bfloat16, float16, float64), got {x.dtype}")
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (N, {self.dim}), got {tuple(x.shape)}")
        if x.device != self.corr.device:
            raise ValueError(f"x is on device {x.device} but the predictor is on device {self.corr.device}; move one of them")

    def _synced(self) -> bool:
        return self.sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    # ------------------------------------------------------------------ steps
    def attach(self, optimizer: torch.optim.Optimizer | None = None) -> "Attachment":
        """Make every ``optimizer.step()`` one DirectPred step (through a step post-hook).

        From then on training-mode calls only accumulate their batch's moments, and
        :meth:`step` (run by the hook after each optimizer step) folds them into F as one
        batch, counts the step and re-sets W_p when due. Without an optimizer, call
        :meth:`step` yourself after each optimizer step. An optimizer step that does not
        happen (skipped by a ``GradScaler`` on inf gradients) is no step here either: its
        calls are folded with the next step's.

        Returns:
            A handle whose ``remove()`` detaches (calls not yet folded are dropped) and
            makes each training call one step again.

        Raises:
            RuntimeError: already attached.
        """
        if self._attached:
            raise RuntimeError("DirectPredictor is already attached; remove() the previous handle first")
        hook = None
        if optimizer is not None:
            hook = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step())
        self._bring_weight_up_to_date()  # a rebuild owed by the per-call mode (or a load)
        self._moments.zero_()
        self._attached = True
        self._resolve_backend()
        return Attachment(self, hook)

    def _resolve_backend(self) -> None:
        """Resolve the backend for this device now, in eager code. Attached training calls
        run traced under torch.compile, and a first resolution there (it imports the
        backend) would break the graph for good. A backend that cannot run on this device
        (yet: the module may still move) is reported at its first use, as before."""
        try:
            backends.resolve(self.backend, self.corr.device)
        except RuntimeError:
            pass

    @torch.compiler.disable
    @torch.no_grad()
    def step(self) -> None:
        """One DirectPred step: fold every training call since the last step into F as
        one batch (Eq. 19), then re-set W_p if due (Eq. 18). Run by the hook of
        :meth:`attach` after each optimizer step; call it yourself in a manual loop.

        Raises:
            RuntimeError: not attached (then every training call is a step already).
        """
        if not self._attached:
            raise RuntimeError("DirectPredictor.step() folds the calls since the last step: call attach() first "
                               "(without it every training-mode call is one step)")
        self._fold()

    @torch.compiler.disable
    @torch.no_grad()
    def _step_with_one_call(self, x: Tensor, masks: Tensor | None, projections: Tensor | None) -> None:
        if masks is None and not self._synced():
            self._fold(batch=x)  # the fused statistics kernel, straight from x
        else:
            self._accumulate(x, masks, projections)
            self._fold()

    @torch.no_grad()
    def _accumulate(self, x: Tensor, masks: Tensor | None, projections: Tensor | None) -> None:
        """Add one call's batch moments to the step's accumulator (traceable; no host sync)."""
        if x.shape[0] == 0:
            return
        acc = self._moment_views()
        usable = functional.usable_batch(x)  # a bad call spoils its step: recorded, its values zeroed
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        functional.add_moments_(acc.gram, acc.total, acc.count, torch.where(usable, x, zero), masks, backend=self.backend)
        if projections is not None:
            acc.projections.add_(torch.where(usable, projections, 0.0).sum(0))
        acc.bad.add_((~usable).float())

    def _moment_views(self) -> _Moments:
        gram, total, count, projections, bad = self._moments.split(self._moment_sizes)
        stack, d = self.corr.shape[:-2], self.dim
        return _Moments(gram.view(*stack, d, d), total.view(*stack, d), count.view(stack), projections, bad.view(()))

    def _fold(self, batch: Tensor | None = None) -> None:
        """The one fold of a step: F (and the mean, the thresholds) <- EMA with this step's
        batch, a non-finite batch skipped on the device, counters, then the rebuild if due.

        ``batch`` given: a step made of one call, in one process, without partitions,
        folded straight from x by the backend's fused kernel. Otherwise the accumulated
        moments, all-reduced first under DDP (every rank takes part, even with N = 0).
        """
        first = self.folded == 0
        if batch is not None:
            n = batch.shape[0]
            usable = functional.usable_batch(batch)
            fold = usable & (n > 0)
            if n > 0:
                functional.corr_ema_(self.corr, batch, self.rho, first=first, fold=fold,
                                     mean=self.mean if self.zero_mean else None, backend=self.backend)
            skipped = ~usable
        else:
            if self._synced():
                dist.all_reduce(self._moments)
            acc = self._moment_views()
            skipped = acc.bad > 0
            fold = (acc.count > 0) & ~skipped  # per F: a half with no sample keeps its F
            weight = functional.ema_weight(self.rho, first=first, fold=fold)
            n = acc.count.clamp(min=1)
            functional.ema_(self.corr, acc.gram / n[..., None, None], weight[..., None, None])
            if self.zero_mean:
                functional.ema_(self.mean, acc.total / n[..., None], weight[..., None])
            if self.partitions:
                self._fold_thresholds(acc, first.all(), skipped)
            self._moments.zero_()
        self.folded += fold
        self.num_skipped += skipped
        self.num_updates += 1
        self._steps += 1
        if self.corr.device.type == "cpu":
            self._warn_new_skips()
        if (self._steps - 1) % self.freq == 0:  # W_p for the next step includes this batch
            self._schedule_rebuild()

    def _fold_thresholds(self, acc: _Moments, first: Tensor, skipped: Tensor) -> None:
        """The eval-mode split: an EMA of the training batches' mean projections."""
        samples = acc.count[0] + acc.count[1]  # every sample is above or below hyperplane 0
        weight = functional.ema_weight(self.rho, first=first, fold=(samples > 0) & ~skipped)
        functional.ema_(self.thresholds, acc.projections / samples.clamp(min=1), weight)

    def _warn_new_skips(self) -> None:
        skipped = int(self.num_skipped)
        if skipped > self._skips_warned:
            warnings.warn(
                f"DirectPredictor: {skipped - self._skips_warned} batch(es) with non-finite or "
                f"huge features were skipped (F unchanged); {skipped} in total",
                RuntimeWarning,
                stacklevel=4,
            )
            self._skips_warned = skipped

    # ------------------------------------------------------------------ rebuild
    def _schedule_rebuild(self) -> None:
        if self.async_rebuild:
            # F as of this step, copied: the next fold must not change what the rebuild reads.
            self._pending = start_rebuild(self._weight_from, self._target_corr().clone())
        elif self._attached:
            self._rebuild()  # after the optimizer step, as the authors do
        else:
            self._rebuild_owed = True  # at the next call: after this call's optimizer step

    @torch.compiler.disable
    @torch.no_grad()
    def _bring_weight_up_to_date(self) -> None:
        """Swap in a finished async rebuild, or do a rebuild the last step left due."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            try:
                weight = pending.collect()
            except EighError as err:
                self._record_eigh_failure(err)
            else:
                self._install_weight(weight)
        elif self._rebuild_owed:
            self._rebuild()

    def _target_corr(self) -> Tensor:
        return functional.covariance(self.corr, self.mean) if self.zero_mean else self.corr

    def _weight_from(self, corr: Tensor) -> Tensor:
        state = None
        if self._keeps_solver_state:
            if not self._solver_primed:
                self.solver_state.copy_(solvers.init_state(self.solver, corr))
                self._solver_primed = True
            state = self.solver_state
        return functional.solve_weight(corr, self.eig_map, backend=self.backend, solver=self.solver,
                                       solver_state=state)

    def _rebuild(self) -> Tensor | bool:
        """W_p <- the map of F (Eq. 18), keeping the previous W_p if that fails."""
        self._rebuild_owed = False
        try:
            weight = self._weight_from(self._target_corr())
        except EighError as err:
            return self._record_eigh_failure(err)
        return self._install_weight(weight)

    def _install_weight(self, weight: Tensor) -> Tensor:
        """``W_p <- weight`` where it is finite, else keep W_p and count a failure.

        Decided on the device: a GPU eigensolver reports failure later, as NaN, so no
        host sync is needed here. Returns the 0-dim bool "installed"."""
        ok = torch.isfinite(weight).all()
        self.weight.copy_(torch.where(ok, weight, self.weight))
        self.num_eigh_failures += ~ok
        if weight.device.type == "cpu" and not ok:  # reading a CPU tensor is free
            warnings.warn("DirectPredictor: the rebuilt W_p is not finite; keeping the previous W_p",
                          RuntimeWarning, stacklevel=4)
        return ok

    def _record_eigh_failure(self, err: Exception) -> bool:
        """Count an eigensolver failure (W_p is left as it was) and warn."""
        self.num_eigh_failures += 1
        warnings.warn(f"DirectPredictor: {err}; keeping the previous W_p", RuntimeWarning, stacklevel=4)
        return False

    @torch.no_grad()
    def refresh(self) -> bool:
        """Set W_p from F now (Eq. 18). Returns False if W_p was kept (the eigensolver
        failed). On GPU the answer is read from the device (a host sync)."""
        self._pending = None
        return bool(self._rebuild())

    # ------------------------------------------------------------------ state
    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True):
        # Casts (.half(), .double(), .to(dtype)) reach W_p but not the statistics: F, the
        # mean, the thresholds and the accumulator stay float32 (taken from their float32
        # values, not from the cast), while following every device move.
        def float32_after(old: Tensor, new: Tensor) -> Tensor:
            return new if new.dtype == torch.float32 else old.to(new.device)

        before = {name: self._buffers[name] for name in _FLOAT32_STATE if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            self._buffers[name] = float32_after(old, self._buffers[name])
        self._moments = float32_after(self._moments, fn(self._moments))
        if self._attached:
            self._resolve_backend()  # on the new device
        return self

    def state_dict(self, *args, **kwargs):
        self._warn_new_skips()  # on GPU, skips are reported here rather than per step
        return super().state_dict(*args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # All or nothing: check every shape before anything is copied.
        mismatches = []
        for name, current in [*self._parameters.items(), *self._buffers.items()]:
            key = prefix + name
            if current is None or name in self._non_persistent_buffers_set or key not in state_dict:
                continue
            value = state_dict[key]
            if isinstance(value, Tensor) and value.shape != current.shape:
                mismatches.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} from "
                                  f"checkpoint, the shape in current model is {tuple(current.shape)}; nothing was loaded "
                                  "into this DirectPredictor.")
        self._load_rejected = bool(mismatches)
        if mismatches:
            error_msgs.extend(mismatches)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def __getstate__(self):
        # What belongs to this process does not travel (deepcopy, pickle): an async rebuild
        # in flight (the copy redoes it from the same F, with the same result) and the
        # optimizer hook (the copy makes one step per call until attached itself).
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state["_pending"] = None
        state["_rebuild_owed"] = self._rebuild_owed or self._pending is not None
        state["_attached"] = False
        return state


class Attachment:
    """What :meth:`DirectPredictor.attach` returns: ``remove()`` undoes it."""

    def __init__(self, predictor: DirectPredictor, hook) -> None:
        self.predictor, self.hook = predictor, hook

    def remove(self) -> None:
        if self.hook is not None:
            self.hook.remove()
        self.predictor._attached = False
        self.predictor._moments.zero_()


def _after_load(module: DirectPredictor, incompatible_keys) -> None:
    """After load_state_dict: host mirrors follow the loaded buffers (one read), a rebuild
    computed from the old F is dropped, and the rebuild the loaded step left due is owed."""
    if module._load_rejected:
        module._load_rejected = False
        return
    module._steps = int(module.num_updates)
    module._skips_warned = int(module.num_skipped)
    module._pending = None
    module._moments.zero_()
    module._rebuild_owed = module._steps >= 1 and (module._steps - 1) % module.freq == 0
    if module._keeps_solver_state:
        module._solver_primed = bool(module.solver_state.abs().amax() > 0)
    if module._attached:
        module._bring_weight_up_to_date()
