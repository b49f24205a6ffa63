"""DirectPredictor: the DirectPred linear predictor as a drop-in ``nn.Module``."""
from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as nnf
from torch import Tensor, nn

from . import backends, functional

# |x| above this would overflow x^T x in float32 for any realistic dim: treat as bad data.
_MAX_ABS_FEATURE = 1e17


class DirectPredictor(nn.Module):
    """Linear, bias-free predictor W_p set from the running correlation of its inputs.

    DirectPred (Tian, Chen & Ganguli, ICML 2021, Sec. 4): F is an EMA of the batch
    correlation of the predictor's inputs (Eq. 19), ``F = U diag(s) U^T``, and
    ``W_p = U diag(p) U^T`` with ``p`` from the eigenvalue map (Eq. 18). W_p is never
    trained by gradient when ``freq == 1``; with ``freq > 1`` it is re-set every
    ``freq`` steps and trained by the optimizer in between (Table 8).

    In training mode **one call is one optimizer step**: (1) if a rebuild is due,
    W_p is set from F (outside autograd); (2) ``y = x @ W_p^T``; (3) ``x.detach()``
    is folded into F. A rebuild is due after statistics update k (k = 0, 1, ...)
    when ``k % freq == 0``, so the W_p used at step t+1 already includes batch t, as
    in the authors' trainer. For BYOL call it once per step with both views
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
        sync: under ``torch.distributed``, take the batch correlation over all ranks
            (one all-reduce per step) so every rank holds the same F and W_p.
        backend: see :mod:`fastpred.backends` (``"auto"``, ``"torch"``, ...).

    Attributes:
        weight: ``nn.Parameter`` (d, d), W_p. ``requires_grad`` only when ``freq > 1``.
        corr: buffer (d, d) float32, F.
        mean: buffer (d,) float32, the EMA of the mean (used when ``zero_mean``).
        num_updates: int64 buffer, training steps taken (skipped ones included).
        num_skipped: int64 buffer, steps whose statistics were skipped (non-finite x).
        num_eigh_failures: int64 buffer, rebuilds that kept the previous W_p.

    Robustness: a batch with non-finite values leaves F unchanged (y is still
    returned), is counted and, on CPU, warned about at once; on GPU the skip is
    decided on the device without a host sync, and the warning is issued when
    ``state_dict()`` is next taken. A failed eigendecomposition is retried in
    float64; if that fails too W_p keeps its previous value, with a warning.

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
    ) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 <= rho < 1:
            raise ValueError(f"rho must be a number in [0, 1), got {rho!r}")
        if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
            raise ValueError(f"freq must be an integer >= 1, got {freq!r}")
        functional.check_map_args(eps=eps, power=power, eps_mode=eps_mode, min_eig=min_eig)
        backends.check_name(backend)
        self.dim, self.rho, self.eps, self.freq = dim, float(rho), float(eps), freq
        self.power, self.eps_mode, self.min_eig = float(power), eps_mode, float(min_eig)
        self.zero_mean, self.sync, self.backend = bool(zero_mean), bool(sync), backend

        # nn.Linear's initialisation, as the authors' predictor: W_p before the first rebuild.
        weight = torch.empty(dim, dim)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self.weight = nn.Parameter(weight, requires_grad=freq > 1)
        self.register_buffer("corr", torch.zeros(dim, dim))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))
        self.register_buffer("num_skipped", torch.zeros((), dtype=torch.int64))
        self.register_buffer("num_eigh_failures", torch.zeros((), dtype=torch.int64))
        # Host mirrors of the counters, so that the hot path never reads the device.
        self._steps = 0
        self._skips_warned = 0
        self.register_load_state_dict_post_hook(_sync_host_counters)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, rho={self.rho}, eps={self.eps}, freq={self.freq}, power={self.power}, "
            f"eps_mode={self.eps_mode!r}, zero_mean={self.zero_mean}, backend={self.backend!r}"
        )

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        """Predict ``x @ W_p^T``; in training mode also one DirectPred step (see class doc).

        Args:
            x: ``(N, dim)`` float32, bfloat16 or float16 on the module's device.
        """
        self._check_input(x)
        if self.training and self._rebuild_due():
            self.refresh()
        # With freq == 1 W_p is set, never trained: no gradient reaches it.
        weight = self.weight if self.freq > 1 else self.weight.detach()
        if not torch.is_autocast_enabled(x.device.type):
            weight = weight.to(x.dtype)
        y = nnf.linear(x, weight)
        if self.training:
            self._update_statistics(x.detach())
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
        # After statistics update k = steps - 1, rebuild when k % freq == 0.
        return self._steps >= 1 and (self._steps - 1) % self.freq == 0

    # --------------------------------------------------------------- statistics
    @torch.no_grad()
    def _update_statistics(self, x: Tensor) -> None:
        """Fold one batch into F (Eq. 19), skipping it when it is not finite."""
        mean = self.mean if self.zero_mean else None
        peak = x.abs().amax()
        usable = torch.isfinite(peak) & (peak < _MAX_ABS_FEATURE)  # 0-dim bool, on x's device
        if self._synced():
            self._update_synced(x, usable, mean)
        elif x.device.type == "cpu":
            if usable:  # reading a CPU tensor costs no device sync
                first = int(self.num_updates) == int(self.num_skipped)
                functional.corr_ema_(self.corr, x, self.rho, first=first, mean=mean, backend=self.backend)
            self.num_skipped += ~usable
        else:
            # Decide on the device: a skipped batch is zeroed and blended with weight 0.
            x = torch.where(usable, x, torch.zeros((), dtype=x.dtype, device=x.device))
            weight = self._blend_weight(usable)
            backends.resolve(self.backend, x.device).corr_ema_(self.corr, x, weight, mean)
            self.num_skipped += ~usable
        self.num_updates += 1
        self._steps += 1
        if x.device.type == "cpu":
            self._warn_new_skips()

    def _blend_weight(self, usable: Tensor) -> Tensor:
        """EMA weight as a device tensor: 1 - rho, 1 for the first update, 0 to skip."""
        first = self.num_updates == self.num_skipped
        weight = torch.where(first, 1.0, 1.0 - self.rho).to(self.corr.device)
        return torch.where(usable, weight, torch.zeros_like(weight))

    def _synced(self) -> bool:
        return self.sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _update_synced(self, x: Tensor, usable: Tensor, mean: Tensor | None) -> None:
        """Batch statistics over the union of all ranks' batches: one all-reduce."""
        d = self.dim
        x = torch.where(usable, x, torch.zeros((), dtype=x.dtype, device=x.device))
        impl = backends.resolve(self.backend, x.device)
        # One flat buffer: [x^T x (d*d), sum x (d), N, number of bad ranks].
        buf = torch.cat([
            impl.gram(x).reshape(-1),
            x.float().sum(0),
            torch.tensor([x.shape[0], 0.0], device=x.device),
        ])
        buf[-1] = (~usable).float()
        dist.all_reduce(buf)
        n = buf[-2]
        usable = buf[-1] == 0
        batch_corr = torch.where(usable, buf[: d * d].view(d, d) / n, 0.0)
        weight = self._blend_weight(usable)
        self.corr.lerp_(batch_corr, weight)
        if mean is not None:
            mean.lerp_(torch.where(usable, buf[d * d : d * d + d] / n, 0.0), weight)
        self.num_skipped += ~usable

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

    # ------------------------------------------------------------------ rebuild
    @torch.no_grad()
    def refresh(self) -> bool:
        """Set W_p from F now (Eq. 18). Returns False if W_p was kept (eigh failed)."""
        corr = functional.covariance(self.corr, self.mean) if self.zero_mean else self.corr
        try:
            weight = functional.directpred_weight(
                corr, eps=self.eps, power=self.power, eps_mode=self.eps_mode,
                min_eig=self.min_eig, backend=self.backend,
            )
        except functional.EighError as err:
            self.num_eigh_failures += 1
            warnings.warn(f"DirectPredictor: {err}; keeping the previous W_p", RuntimeWarning, stacklevel=2)
            return False
        self.weight.copy_(weight)
        return True


def _sync_host_counters(module: DirectPredictor, incompatible_keys) -> None:
    """After load_state_dict: the host mirrors follow the loaded buffers (one read)."""
    module._steps = int(module.num_updates)
    module._skips_warned = int(module.num_skipped)
