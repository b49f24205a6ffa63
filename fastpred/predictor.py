"""DirectPredictor: the DirectPred linear predictor as a drop-in ``nn.Module``."""
from __future__ import annotations

import math
import warnings
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist
import torch.nn.functional as nnf
from torch import Tensor, nn

from . import backends, functional, solvers

# |x| above this would overflow x^T x in float32 for any realistic dim: treat as bad data.
_MAX_ABS_FEATURE = 1e17

_worker: ThreadPoolExecutor | None = None  # one thread for every CPU async rebuild


def _rebuild_worker() -> ThreadPoolExecutor:
    global _worker
    if _worker is None:
        _worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastpred-rebuild")
    return _worker


class DirectPredictor(nn.Module):
    """Linear, bias-free predictor W_p set from the running correlation of its inputs.

    DirectPred (Tian, Chen & Ganguli, ICML 2021, Sec. 4): F is an EMA of the batch
    correlation of the predictor's inputs (Eq. 19), ``F = U diag(s) U^T``, and
    ``W_p = U diag(p) U^T`` with ``p`` from the eigenvalue map (Eq. 18). W_p is never
    trained by gradient when ``freq == 1``; with ``freq > 1`` it is re-set every
    ``freq`` steps and trained by the optimizer in between (Table 8).

    In training mode **one call is one optimizer step**: (1) if a rebuild is due,
    W_p is set from F (outside autograd); (2) ``y = x @ W_p^T``; (3) ``x.detach()``
    is folded into F. A rebuild is due after step k (k = 0, 1, ...) when
    ``k % freq == 0``, so the W_p used at step t+1 already includes batch t, as in
    the authors' trainer. For BYOL call it once per step with both views
    concatenated. In eval mode it returns y and changes nothing.

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
            (one all-reduce per step) so every rank holds the same F and W_p.
        backend: see :mod:`fastpred.backends` (``"auto"``, ``"torch"``, ...).
        partitions: k > 0 gives the paper's feature-dependent W_p (Sec. 4, "random
            partitions"; 78.20 on STL-10 with k = 6): k fixed random hyperplanes
            split the batch at the batch mean of each projection; each half keeps
            its own F, hence 2k predictors, and a sample's prediction averages the
            k predictors of the halves it falls in (the authors' ``partition`` mode,
            for any dim). One difference from their code, which rebuilt every step
            from statistics that already included the current batch: here the
            rebuild follows ``freq`` and the order above, like the plain predictor.
            A half that receives no sample keeps its F (they blended in zeros).
        solver: how W_p is obtained from F: ``"eigh"`` (default, exact),
            ``"newton_schulz"`` (power 0.5; matmuls only, no host sync: for GPUs) or
            ``"warm"`` (refines last rebuild's eigenbasis; pays off only for a slow
            EMA, rho >= 0.9). See :mod:`fastpred.solvers`.
        async_rebuild: compute the rebuild for step t+1 right after step t's
            statistics update, on a side CUDA stream or a worker thread, so that it
            overlaps the backward pass; it is swapped in at the next forward.
            Bit-identical to the synchronous path.

    Attributes:
        weight: ``nn.Parameter`` (d, d), W_p — (2k, d, d) with partitions, rows
            2i / 2i+1 the predictors of the upper / lower half of hyperplane i.
            ``requires_grad`` only when ``freq > 1``.
        corr: buffer, F, float32, shaped like ``weight``.
        mean: buffer (d,) or (2k, d): the EMA of the mean (used when ``zero_mean``).
        planes, thresholds: buffers (d, k) and (k,): the random hyperplanes and the
            EMA of the projections' batch means (the split used in eval mode).
        folded: int64 buffer (or (2k,)): batches folded into each F.
        num_updates: int64 buffer, training steps taken (skipped ones included).
        num_skipped: int64 buffer, steps whose statistics were skipped (non-finite x).
        num_eigh_failures: int64 buffer, rebuilds that kept the previous W_p.

    Robustness: a batch with non-finite values leaves F unchanged (y is still
    returned), is counted and, on CPU, warned about at once; on GPU the skip is
    decided on the device without a host sync and the warning comes with the next
    ``state_dict()``. A failed eigendecomposition is retried in float64; if that
    fails too W_p keeps its previous value, with a warning.

    Example:
        >>> pred = DirectPredictor(128)
        >>> z = torch.randn(256, 128)   # both views of a batch, concatenated
        >>> p = pred(z)                 # one training step
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
        functional.check_map_args(eps=eps, power=power, eps_mode=eps_mode, min_eig=min_eig)
        functional.check_solver(solver, power)
        backends.check_name(backend)
        self.dim, self.rho, self.eps, self.freq = dim, float(rho), float(eps), freq
        self.power, self.eps_mode, self.min_eig = float(power), eps_mode, float(min_eig)
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
            self.register_buffer("planes", torch.randn(dim, partitions))
            self.register_buffer("thresholds", torch.zeros(partitions))
        if solver != "eigh":
            # What the solver carries from one rebuild to the next; primed at the first one.
            self.register_buffer("solver_state", torch.zeros_like(solvers.init_state(solver, self.corr)))
            self._solver_primed = False
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))
        self.register_buffer("num_skipped", torch.zeros((), dtype=torch.int64))
        self.register_buffer("num_eigh_failures", torch.zeros((), dtype=torch.int64))
        # Host mirrors of the counters, so that the hot path never reads the device.
        self._steps = 0
        self._skips_warned = 0
        self._pending: tuple | None = None  # an async rebuild in flight
        self.register_load_state_dict_post_hook(_after_load)

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
        """Predict ``x @ W_p^T``; in training mode also one DirectPred step (see class doc).

        Args:
            x: ``(N, dim)`` float32, bfloat16 or float16 on the module's device.
        """
        self._check_input(x)
        if self.training and self._rebuild_due():
            self._rebuild_now_or_collect()
        # With freq == 1 W_p is set, never trained: no gradient reaches it.
        weight = self.weight if self.freq > 1 else self.weight.detach()
        if not torch.is_autocast_enabled(x.device.type):
            weight = weight.to(x.dtype)
        if self.partitions:
            sides = self._sides(x.detach())  # (2k, N)
            y = self._partitioned_linear(x, weight, sides)
        else:
            sides = None
            y = nnf.linear(x, weight)
        if self.training:
            self._update_statistics(x.detach(), sides)
            if self.async_rebuild and self._rebuild_due():
                self._start_async_rebuild()
        return y

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor (float32, bfloat16, float16), got {x.dtype}")
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (N, {self.dim}), got {tuple(x.shape)}")
        if x.device != self.corr.device:
            raise ValueError(f"x is on device {x.device} but the predictor is on device {self.corr.device}; move one of them")

    def _rebuild_due(self) -> bool:
        # Due at the start of step t = self._steps when (t - 1) % freq == 0.
        return self._steps >= 1 and (self._steps - 1) % self.freq == 0

    # --------------------------------------------------------------- partitions
    @torch.no_grad()
    def _sides(self, x: Tensor) -> Tensor:
        """(2k, N) 0/1 float: row 2i is 1 where sample n lies above hyperplane i, row 2i+1 below.

        Training splits at the batch mean of each projection (over all ranks when
        synced), as the authors do; eval mode splits at its running mean.
        """
        proj = x.float() @ self.planes  # (N, k)
        if self.training:
            total = torch.cat([proj.sum(0), proj.new_tensor([proj.shape[0]])])
            if self._synced():
                dist.all_reduce(total)
            threshold = total[:-1] / total[-1]
            # The eval-mode split: an EMA of the training thresholds (a bad batch leaves it).
            keep = torch.where(torch.isfinite(threshold), threshold, self.thresholds)
            self.thresholds.lerp_(keep, 1.0 if self._steps == 0 else 1.0 - self.rho)
        else:
            threshold = self.thresholds
        above = (proj >= threshold).float().T  # (k, N)
        return torch.stack([above, 1.0 - above], dim=1).reshape(2 * self.partitions, -1)

    def _partitioned_linear(self, x: Tensor, weight: Tensor, sides: Tensor) -> Tensor:
        """y_n = (1/k) sum_i W_{i, side of n} x_n, without forming per-sample matrices."""
        y_all = torch.einsum("nd,jed->jne", x, weight)  # (2k, N, d): every predictor on every sample
        coef = (sides / self.partitions).to(y_all.dtype)  # (2k, N)
        return torch.einsum("jn,jne->ne", coef, y_all)

    # --------------------------------------------------------------- statistics
    @torch.no_grad()
    def _update_statistics(self, x: Tensor, sides: Tensor | None) -> None:
        """Fold one batch into F (Eq. 19), skipping it when it is not finite."""
        mean = self.mean if self.zero_mean else None
        peak = x.abs().amax()
        usable = torch.isfinite(peak) & (peak < _MAX_ABS_FEATURE)  # 0-dim bool, on x's device
        if sides is not None or self._synced():
            self._update_from_moments(x, usable, sides)
        elif x.device.type == "cpu":
            if usable:  # reading a CPU tensor costs no device sync
                first = int(self.folded) == 0
                functional.corr_ema_(self.corr, x, self.rho, first=first, mean=mean, backend=self.backend)
                self.folded += 1
            self.num_skipped += ~usable
        else:
            # Decide on the device: a skipped batch is zeroed and blended with weight 0.
            x = torch.where(usable, x, torch.zeros((), dtype=x.dtype, device=x.device))
            weight = self._blend_weight(usable)
            backends.resolve(self.backend, x.device).corr_ema_(self.corr, x, weight, mean)
            self.folded += usable
            self.num_skipped += ~usable
        self.num_updates += 1
        self._steps += 1
        if x.device.type == "cpu":
            self._warn_new_skips()

    def _blend_weight(self, fold: Tensor) -> Tensor:
        """EMA weights as device tensors: 1 - rho, 1 for a first update, 0 where not folding."""
        weight = torch.where(self.folded == 0, 1.0, 1.0 - self.rho).to(self.corr.device)
        return torch.where(fold, weight, torch.zeros_like(weight))

    def _synced(self) -> bool:
        return self.sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _update_from_moments(self, x: Tensor, usable: Tensor, sides: Tensor | None) -> None:
        """Statistics of each F from the batch moments of its samples; over all ranks
        when synced, with one all-reduce of [x^T x, sum x, count] per F plus a bad flag."""
        d = self.dim
        x = torch.where(usable, x, torch.zeros((), dtype=x.dtype, device=x.device)).float()
        if sides is None:
            sides = torch.ones(1, x.shape[0], device=x.device)  # (1, N): a single F
        m = sides.shape[0]
        impl = backends.resolve(self.backend, x.device)
        grams = impl.gram(sides.unsqueeze(-1) * x)  # (m, d, d); sides are 0/1 so squares are harmless
        buf = torch.cat([grams.reshape(-1), (sides @ x).reshape(-1), sides.sum(1), (~usable).float().reshape(1)])
        if self._synced():
            dist.all_reduce(buf)
        grams, sums = buf[: m * d * d].view(m, d, d), buf[m * d * d : m * d * (d + 1)].view(m, d)
        counts, bad = buf[m * d * (d + 1) : -1], buf[-1]
        fold = (counts > 0) & (bad == 0)  # (m,)
        n = counts.clamp(min=1)
        weight = self._blend_weight(fold.view(self.folded.shape)).view(m)
        self.corr.view(m, d, d).lerp_(torch.where(fold[:, None, None], grams / n[:, None, None], 0.0), weight[:, None, None])
        if self.zero_mean:
            self.mean.view(m, d).lerp_(torch.where(fold[:, None], sums / n[:, None], 0.0), weight[:, None])
        self.folded += fold.view(self.folded.shape)
        self.num_skipped += bad != 0

    def _warn_new_skips(self) -> None:
        skipped = int(self.num_skipped)
        if skipped > self._skips_warned:
            warnings.warn(
                f"DirectPredictor: {skipped - self._skips_warned} batch(es) with non-finite or "
                f"huge features were skipped (F unchanged); {skipped} in total",
                RuntimeWarning,
                stacklevel=3,
            )
            self._skips_warned = skipped

    def state_dict(self, *args, **kwargs):
        self._warn_new_skips()  # on GPU, skips are reported here rather than per step
        return super().state_dict(*args, **kwargs)

    def __getstate__(self):
        # An async rebuild in flight does not travel (deepcopy, pickle): the copy
        # recomputes it from the same F at its next forward, with the same result.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_pending"] = None
        return state

    # ------------------------------------------------------------------ rebuild
    def _target_corr(self) -> Tensor:
        return functional.covariance(self.corr, self.mean) if self.zero_mean else self.corr

    def _weight_from(self, corr: Tensor) -> Tensor:
        state = None
        if self.solver != "eigh":
            if not self._solver_primed:
                self.solver_state.copy_(solvers.init_state(self.solver, corr))
                self._solver_primed = True
            state = self.solver_state
        return functional.directpred_weight(
            corr, eps=self.eps, power=self.power, eps_mode=self.eps_mode, min_eig=self.min_eig,
            backend=self.backend, solver=self.solver, solver_state=state,
        )

    @torch.no_grad()
    def refresh(self) -> bool:
        """Set W_p from F now (Eq. 18). Returns False if W_p was kept (eigh failed)."""
        self._pending = None
        try:
            weight = self._weight_from(self._target_corr())
        except functional.EighError as err:
            return self._keep_weight(err)
        self.weight.copy_(weight)
        return True

    def _keep_weight(self, err: Exception) -> bool:
        self.num_eigh_failures += 1
        warnings.warn(f"DirectPredictor: {err}; keeping the previous W_p", RuntimeWarning, stacklevel=3)
        return False

    @torch.no_grad()
    def _start_async_rebuild(self) -> None:
        """Compute the next W_p now, off the critical path (side stream or worker thread)."""
        corr = self._target_corr().clone()  # F as of this step; the next forward uses exactly it
        if corr.is_cuda:
            main = torch.cuda.current_stream(corr.device)
            side = getattr(self, "_side_stream", None) or torch.cuda.Stream(corr.device)
            self._side_stream = side
            side.wait_stream(main)
            with torch.cuda.stream(side):
                try:
                    weight = self._weight_from(corr)
                except functional.EighError as err:
                    weight = err
                done = torch.cuda.Event()
                done.record(side)
            if isinstance(weight, Tensor):
                weight.record_stream(main)
            self._pending = ("cuda", weight, done)
        else:
            self._pending = ("cpu", _rebuild_worker().submit(self._weight_from, corr), None)

    @torch.no_grad()
    def _rebuild_now_or_collect(self) -> None:
        if self._pending is None:
            self.refresh()
            return
        kind, result, done = self._pending
        self._pending = None
        if kind == "cuda":
            torch.cuda.current_stream(self.corr.device).wait_event(done)
        elif isinstance(result, Future):
            try:
                result = result.result()
            except functional.EighError as err:
                result = err
        if isinstance(result, Exception):
            self._keep_weight(result)
        else:
            self.weight.copy_(result)


def _after_load(module: DirectPredictor, incompatible_keys) -> None:
    """After load_state_dict: host mirrors follow the loaded buffers (one read), and a
    rebuild computed from the old F is dropped."""
    module._steps = int(module.num_updates)
    module._skips_warned = int(module.num_skipped)
    module._pending = None
    if module.solver != "eigh":
        module._solver_primed = bool(module.solver_state.abs().amax() > 0)
