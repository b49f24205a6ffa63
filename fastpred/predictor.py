"""DirectPredictor: the DirectPred linear predictor as a drop-in ``nn.Module``."""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as nnf
from torch import Tensor, nn

from . import backends, functional, solvers
from ._stack import user_stacklevel
from .attachment import Attachment, Misuse, watch
from .backends import Backend
from .eig_map import EigMap
from .eigh import EighError
from .partitions import batch_thresholds, half_space_masks, partitioned_linear, project, random_hyperplanes
from .schedule import RebuildSchedule
from .statistics import RunningStatistics, StepStatistics

# State that stays float32 whatever dtype the module is cast to (.half(), .double(), ...).
_FLOAT32_STATE = ("corr", "mean", "planes", "thresholds", "solver_state")


class DirectPredictor(nn.Module):
    """Linear, bias-free predictor W_p set from the running correlation of its inputs.

    DirectPred (Tian, Chen & Ganguli, ICML 2021, Sec. 4): F is an EMA of the batch
    correlation of the predictor's inputs (Eq. 19), ``F = U diag(s) U^T``, and
    ``W_p = U diag(p) U^T`` with ``p`` from the eigenvalue map (Eq. 18). W_p is never
    trained by gradient when ``freq == 1``; with ``freq > 1`` it is re-set every
    ``freq`` steps and trained by the optimizer in between (Table 8). How this follows
    the authors' code, and where it differs: docs/design.md ("The module's contract,
    and where it comes from").

    **A step** folds every training-mode call since the last step into F as one batch
    (float32 statistics whatever autocast says; all-reduced under DDP with ``sync``; a
    non-finite step skipped), counts it, and re-sets W_p every ``freq`` steps, so that
    the W_p used at step t+1 includes batch t. When a step ends:

    - after :meth:`attach` (``pred.attach(optimizer)``): at each ``optimizer.step()``,
      so per-view calls ``p1 = pred(z1); p2 = pred(z2)`` equal ``pred(torch.cat([z1, z2]))``;
    - after ``attach()`` without an optimizer: at each :meth:`step`;
    - otherwise at the end of each training call. With ``freq > 1`` the rebuild then
      waits for the call's optimizer step and runs at the next training call,
      ``.eval()``, ``state_dict()`` or :meth:`refresh`.

    Eval mode only predicts. A call uses its own copy of W_p, so any number of calls per
    step back-propagate correctly (eagerly and under ``torch.compile``). A copy
    (``copy.deepcopy``, pickle) starts at a step boundary: training calls recorded
    since the last step belong to the original's step and are not in the copy, which
    is not attached (each training call is one step until it is attached itself).
    Misuse is named once by a RuntimeWarning that points at the user's line (README,
    "Usage"); wrong arguments raise at once, naming the argument.

    Args:
        dim: feature dimension d (W_p is d x d).
        rho: EMA coefficient of Eq. 19, in [0, 1). The paper's best STL-10 value is 0.3.
        eps: the eigenvalue boost of Eq. 18 (0.1 in the paper's best runs).
        freq: rebuild every ``freq`` steps (1 = DirectPred; 5 in Table 8).
        power: p ~ s ** power; 0.5 is DirectPred, 1 is DirectCopy-style.
        eps_mode: ``"relative"`` (default; the authors' code):
            ``p = max((max(s,0)/max s) ** power + eps, min_eig)``; ``"absolute"``
            (Eq. 18 as printed): ``p = max(s,0) ** power + eps max s``.
        zero_mean: use the covariance ``F - m m^T`` (m an EMA of the mean) instead of
            the correlation. Off by default: the paper reports centring hurts.
        min_eig: lower clamp of p in relative mode (the authors' 1e-4).
        sync: under ``torch.distributed``, take the batch statistics over all ranks
            (one all-reduce per step) so every rank holds the same F and W_p. With
            ``sync=False`` each rank keeps its own F (wrap with DDP's
            ``broadcast_buffers=False``, or rank 0's buffers overwrite the others').
        backend: see :mod:`fastpred.backends` (``"auto"``, ``"torch"``, ...).
        partitions: k > 0 gives the paper's feature-dependent W_p (Sec. 4, "random
            partitions"; :mod:`fastpred.partitions`): k fixed random hyperplanes split
            each call's batch at the batch mean of each projection; each half keeps its
            own F, hence 2k predictors, and a sample's prediction averages the k
            predictors of the halves it falls in.
        solver: how W_p is obtained from F: ``"auto"`` (default: DirectCopy's exact
            closed form where it holds, else ``"eigh"``), ``"eigh"``, ``"closed_form"``,
            or the experimental ``"newton_schulz"`` / ``"warm"``. See :mod:`fastpred.solvers`.
        async_rebuild: compute the rebuild right after the fold, on a side CUDA stream or
            a worker thread (:mod:`fastpred.schedule`), swapped in at the next call (or
            ``state_dict()``). Bit-identical to the synchronous path.

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
        num_skipped: int64 buffer, steps whose statistics were skipped (non-finite).
        num_eigh_failures: int64 buffer, rebuilds that kept the previous W_p.
        eig_map: the map's settings, one :class:`~fastpred.eig_map.EigMap`.

    Robustness: a step with non-finite values leaves F unchanged (y is still returned)
    and is counted; on CPU it is warned about at once, on GPU (decided on the device,
    no host sync) with the next ``state_dict()``. A batch of N = 0 samples changes no
    statistics. A failed eigendecomposition is retried (:func:`fastpred.eigh.symmetric_eigh`);
    if it still fails, or a GPU solver reports NaN, W_p keeps its previous value and
    ``num_eigh_failures`` counts it.

    Example:
        >>> pred = DirectPredictor(128)
        >>> opt = torch.optim.SGD(pred.parameters(), lr=0.1)
        >>> handle = pred.attach(opt)   # one fold per optimizer step
        >>> z1, z2 = torch.randn(64, 128), torch.randn(64, 128)
        >>> p1, p2 = pred(z1), pred(z2)  # per-view calls: folded together at opt.step()
    """

    # state_dict layout version (nn.Module saves it in the metadata, _load_from_state_dict
    # receives it): 1 = checkpoints written before this attribute; 2 = the same layout.
    # A future change of the buffers bumps it and converts older checkpoints on load.
    _version = 2

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
        solver: str = "auto",
    ) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
        rho = functional.check_rho(rho)
        if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
            raise ValueError(f"freq must be an integer >= 1, got {freq!r}")
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 0:
            raise ValueError(f"partitions must be an integer >= 0, got {partitions!r}")
        self.eig_map = EigMap(eps=eps, power=power, eps_mode=eps_mode, min_eig=min_eig)
        self._solver = solvers.choose(solver, self.eig_map)  # "auto" made concrete
        backends.check_name(backend)
        self.dim, self.freq = dim, freq
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
        if solvers.keeps_state(self._solver):
            # What the solver carries from one rebuild to the next; primed at the first one.
            shape = (*stack, dim + 1, dim) if self._solver == "warm" else (*stack, dim)
            self.register_buffer("solver_state", torch.zeros(shape))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))
        self.register_buffer("num_skipped", torch.zeros((), dtype=torch.int64))
        self.register_buffer("num_eigh_failures", torch.zeros((), dtype=torch.int64))
        self._stats = StepStatistics(dim, partitions, rho, self.zero_mean)
        self._schedule = RebuildSchedule(freq, self.async_rebuild)
        # Host-side state, so that the hot path never reads the device.
        self._steps = 0  # mirror of num_updates
        self._skips_warned = 0
        self._attachment: Attachment | None = None  # steps are optimizer steps (attach) rather than calls
        self._recorded = False  # a training call since the last step (attached mode)
        self._misuse = Misuse()  # each misuse named once
        self._impl: Backend | None = None
        self._resolve_backend()
        watch.add(self)  # shown every optimizer step (per-call misuse checks)

    @property
    def rho(self) -> float:
        """The EMA coefficient of Eq. 19 (kept by the statistics; settable, checked)."""
        return self._stats.rho

    @rho.setter
    def rho(self, value: float) -> None:
        self._stats.rho = functional.check_rho(value)

    # The map's settings, readable like every other constructor argument (kept in eig_map).
    eps = property(lambda self: self.eig_map.eps)
    power = property(lambda self: self.eig_map.power)
    eps_mode = property(lambda self: self.eig_map.eps_mode)
    min_eig = property(lambda self: self.eig_map.min_eig)

    def extra_repr(self) -> str:
        extra = f", partitions={self.partitions}" if self.partitions else ""
        extra += ", async_rebuild=True" if self.async_rebuild else ""
        extra += f", solver={self.solver!r}" if self.solver != "auto" else ""
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
        per_call = self.training and self._attachment is None
        if per_call or (self.training and self.async_rebuild):
            weight = self._weight_after_catching_up()  # eager: a rebuild may be owed or in flight
        else:
            weight = self._weight_for_call()
        dtype = self.weight.dtype if torch.is_autocast_enabled(x.device.type) else x.dtype
        weight = weight.to(dtype)
        masks = projections = None
        if self.partitions:
            projections = project(x.detach(), self.planes)  # (N, k), float32
            thresholds = batch_thresholds(projections, self._synced()) if self.training else self.thresholds
            masks = half_space_masks(projections, thresholds)  # (2k, N)
            y = partitioned_linear(x, weight, masks)
        else:
            y = nnf.linear(x, weight)
        if self.training:
            self._stats.record(x.detach(), masks, projections, self._backend())
            self._recorded = True
            if per_call:
                self._end_step()  # without attach() each training call is one step
        elif torch.is_grad_enabled() and x.requires_grad:
            self._misuse.eval_in_graph = True  # named at the next optimizer step: model.train() forgotten?
        return y

    def train(self, mode: bool = True) -> "DirectPredictor":
        """Switching to eval mode installs a rebuild still owed or in flight, so that eval
        calls (traceable with ``fullgraph=True``) see the W_p of the last step."""
        if not mode:
            with torch.no_grad():
                self._catch_up()
        return super().train(mode)

    def _weight_for_call(self) -> Tensor:
        """A copy of W_p for one call (detached with freq == 1: set, never trained): the
        graph saves the copy, so a later in-place rebuild cannot invalidate this call."""
        return (self.weight if self.freq > 1 else self.weight.detach()).clone()

    @torch.compiler.disable
    def _weight_after_catching_up(self) -> Tensor:
        """The owed or in-flight rebuild installed, then the call's copy of W_p, made in
        eager code: under torch.compile a copy made in the graph can be rematerialised from
        W_p itself in the backward, which a rebuild between two calls would invalidate."""
        self._catch_up()
        return self._weight_for_call()

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

    def _backend(self) -> Backend:
        """The backend resolved for the module's device (once per device, in eager code:
        attached training calls run traced under torch.compile, where a first resolution,
        which imports the backend, would break the graph)."""
        if self._impl is None or self._impl.device != self.corr.device:
            self._impl = backends.resolve(self.backend, self.corr.device)  # raises what cannot run here
        return self._impl

    def _resolve_backend(self) -> None:
        try:
            self._backend()
        except RuntimeError:
            self._impl = None  # not on this device (yet: the module may still move); reported at first use

    # ------------------------------------------------------------------ steps
    def attach(self, optimizer: torch.optim.Optimizer | None = None) -> "Attachment":
        """Make every ``optimizer.step()`` one DirectPred step (through a step post-hook).

        From then on training-mode calls only record their batch's moments, and the
        optimizer's step folds them into F as one batch, counts the step and re-sets W_p
        when due. Without an optimizer, call :meth:`step` yourself after each optimizer
        step. An optimizer step that does not happen (skipped by a ``GradScaler`` on inf
        gradients) is no step here either: its calls are folded with the next step's.

        Attaching again to the same optimizer returns the current handle (so a second
        ``trainer.fit`` or an ``lr_find`` that re-runs the setup is harmless).

        Returns:
            A handle whose ``remove()`` detaches (calls not yet folded are dropped) and
            makes each training call one step again.

        Raises:
            RuntimeError: already attached to another optimizer (or to none).
        """
        if self._attachment is not None:
            if optimizer is not None and self._attachment.optimizer is optimizer:
                return self._attachment
            raise RuntimeError("DirectPredictor is already attached to "
                               f"{'another optimizer' if self._attachment.optimizer is not None else 'manual steps'}; "
                               "remove() the previous handle first")
        self._misuse.on_attach(self, optimizer)
        self._catch_up()  # a rebuild owed by the per-call mode
        self._stats.clear()
        self._recorded = False
        self._resolve_backend()
        self._attachment = Attachment(self, optimizer)
        return self._attachment

    @torch.no_grad()
    def step(self) -> None:
        """One DirectPred step: fold every training call since the last step into F as
        one batch (Eq. 19), then re-set W_p if due (Eq. 18). For a manual loop: after
        ``attach()`` without an optimizer, call it after each optimizer step.

        Raises:
            RuntimeError: not attached (then every training call is a step already), or
                attached to an optimizer (whose step already runs this).
        """
        if self._attachment is None:
            raise RuntimeError("DirectPredictor.step() folds the calls since the last step: call attach() first "
                               "(without it every training-mode call is one step)")
        if self._attachment.optimizer is not None:
            raise RuntimeError("DirectPredictor is attached to an optimizer, whose step() already makes the "
                               "DirectPred step; calling step() too would fold twice per optimizer step")
        self._end_attached_step()

    @torch.compiler.disable
    @torch.no_grad()
    def _end_attached_step(self) -> None:
        """The end of an optimizer step: fold the training calls made since the last one."""
        if not self._recorded:
            self._misuse.idle_step()
            return
        self._end_step()

    @torch.compiler.disable
    @torch.no_grad()
    def _end_step(self) -> None:
        """The one end of a step, whatever the mode: fold, count, rebuild when due."""
        self._recorded = False
        if self._attachment is None:
            self._misuse.calls += 1
            self._misuse.eval_in_graph = False  # in training mode again
        self._stats.fold(self._running(), self._synced(), self._backend())
        self.num_updates += 1
        self._steps += 1
        if self.corr.device.type == "cpu":
            self._warn_new_skips()
        # Per-call with freq > 1: W_p is trained, so the rebuild waits for this call's optimizer step.
        defer = self._attachment is None and self.freq > 1
        self._set_weight(lambda: self._schedule.after_fold(self._steps, self._weight_from, self._target_corr,
                                                           defer=defer))

    def _running(self) -> RunningStatistics:
        return RunningStatistics(self.corr, self.mean, self.folded, getattr(self, "thresholds", None),
                                 self.num_skipped)

    def _warn_new_skips(self) -> None:
        skipped = int(self.num_skipped)
        if skipped > self._skips_warned:
            warnings.warn(
                f"DirectPredictor: {skipped - self._skips_warned} step(s) with non-finite statistics (a "
                f"non-finite feature, or an x^T x that overflows float32) were skipped (F unchanged); "
                f"{skipped} in total",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
            self._skips_warned = skipped

    # ------------------------------------------------------------------ rebuild
    @torch.no_grad()
    def _catch_up(self) -> None:
        """Install a finished async rebuild, or do the rebuild the last step left owed."""
        if self._schedule.waiting:
            self._set_weight(lambda: self._schedule.take(self._weight_from, self._target_corr))

    def _target_corr(self) -> Tensor:
        return functional.covariance(self.corr, self.mean) if self.zero_mean else self.corr

    def _weight_from(self, corr: Tensor) -> Tensor:
        state = getattr(self, "solver_state", None)
        if state is not None and not self._schedule.primed:
            state.copy_(solvers.init_state(self._solver, corr, backend=self._backend()))
            self._schedule.primed = True
        return functional.solve_weight(corr, self.eig_map, backend=self._backend(), solver=self._solver,
                                       solver_state=state)

    def _set_weight(self, rebuild: Callable[[], Tensor | None]) -> Tensor | None:
        """The one place W_p is set: ``rebuild()`` gives the new W_p (None: nothing is due),
        installed where finite. A failed eigendecomposition (EighError, after the retry
        chain of :func:`fastpred.eigh.symmetric_eigh`) or a non-finite result keeps the
        previous W_p and is counted in ``num_eigh_failures``. Returns the 0-dim bool
        "installed" (a tensor, not read here), or None when nothing was due."""
        try:
            weight = rebuild()
        except EighError as err:
            self.num_eigh_failures += 1
            warnings.warn(f"DirectPredictor: {err}; keeping the previous W_p", RuntimeWarning,
                          stacklevel=user_stacklevel())
            return torch.zeros((), dtype=torch.bool, device=self.weight.device)
        return None if weight is None else self._install_weight(weight)

    def _install_weight(self, weight: Tensor) -> Tensor:
        """``W_p <- weight`` where it is finite, else keep W_p and count a failure.

        Decided on the device: a GPU eigensolver reports failure later, as NaN, so no
        host sync is needed here. Returns the 0-dim bool "installed"."""
        ok = functional.install_weight_(self.weight, weight, backend=self._backend())
        self.num_eigh_failures += ~ok
        if weight.device.type == "cpu" and not ok:  # reading a CPU tensor is free
            warnings.warn("DirectPredictor: the rebuilt W_p is not finite; keeping the previous W_p",
                          RuntimeWarning, stacklevel=user_stacklevel())
        return ok

    @torch.no_grad()
    def refresh(self) -> bool:
        """Set W_p from F now (Eq. 18). Returns False if W_p was kept (the eigensolver
        failed). On GPU the answer is read from the device (a host sync)."""
        self._schedule.drop()
        return bool(self._set_weight(lambda: self._weight_from(self._target_corr())))

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
        self._stats.to(fn(self._stats.moments).device)
        self._resolve_backend()  # on the new device
        return self

    @torch.no_grad()
    def state_dict(self, *args, **kwargs):
        self._catch_up()  # W_p includes the last step's batch
        self._warn_new_skips()  # on GPU, skips are reported here rather than per step
        return super().state_dict(*args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # All or nothing: check every shape and value before anything is copied.
        problems = []
        for name, current in [*self._parameters.items(), *self._buffers.items()]:
            key = prefix + name
            if current is None or name in self._non_persistent_buffers_set or key not in state_dict:
                continue
            value = state_dict[key]
            if not isinstance(value, Tensor):
                continue
            if value.shape != current.shape:
                problems.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} from "
                                f"checkpoint, the shape in current model is {tuple(current.shape)}")
            elif value.is_floating_point() and not bool(torch.isfinite(value).all()):
                problems.append(f"{key} holds non-finite values (a diverged run?)")
        if problems:
            error_msgs.extend(f"{p}; nothing was loaded into this DirectPredictor." for p in problems)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        # The host mirrors follow the loaded buffers (one read), and a rebuild owed or in
        # flight from the old F is dropped: a state_dict() holds the W_p of its F (it
        # catches up before saving).
        self._steps = int(self.num_updates)
        self._skips_warned = int(self.num_skipped)
        self._schedule.drop()
        self._stats.clear()
        self._recorded = False
        state = getattr(self, "solver_state", None)
        self._schedule.primed = state is not None and bool(state.abs().amax() > 0)

    def __getstate__(self):
        # What belongs to this process does not travel (deepcopy, pickle): an async rebuild
        # in flight (the schedule's copy redoes it from the same F, with the same result)
        # and the optimizer hook (the copy makes one step per call until attached itself).
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state["_attachment"] = None
        state["_impl"] = None  # re-resolved on first use (its functions are not picklable)
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        # A copy starts at a step boundary, whether it is attached again or not: the calls
        # recorded since the last step belong to the original's step (attach() drops them too).
        self._stats.clear()
        self._recorded = False
        watch.add(self)
