"""The statistics of a DirectPredictor: what its training calls record, and the fold of a step.

Between two steps every training call adds its batch's moments (x^T x, the sum of x,
the count; per half-space with partitions) to one flat accumulator
(:class:`StepStatistics`). A step folds them, as one batch, into the running
statistics the module keeps as buffers (:class:`RunningStatistics`): all-reduced
first under DDP, a step whose moments are not finite skipped on the device, then the EMA of
F, of the mean and of the partition thresholds (Eq. 19, computed by
:func:`fastpred.functional.fold_moments_`). docs/design.md, "The fold", gives the order.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import functional
from .backends import Backend


class Moments(NamedTuple):
    """Views into the accumulator: the sums of every training call since the last fold."""

    gram: Tensor  # (d, d) or (2k, d, d): sum of x x^T per F
    total: Tensor  # (d,) or (2k, d): sum of x per F
    count: Tensor  # () or (2k,): samples per F
    projections: Tensor  # (k,): sum of the projections on the hyperplanes (partitions only)


class RunningStatistics(NamedTuple):
    """The module's buffers a fold writes (float32, on the module's device)."""

    corr: Tensor  # F, (d, d) or (2k, d, d)
    mean: Tensor  # EMA of the mean, (d,) or (2k, d)
    folded: Tensor  # int64, batches folded into each F
    thresholds: Tensor | None  # (k,) EMA of the mean projections (partitions only)
    num_skipped: Tensor  # int64 (), steps skipped for non-finite moments


class StepStatistics:
    """The per-step accumulator of one predictor and the rule that folds it.

    The accumulator is one flat float32 tensor, so that a step needs one all-reduce
    under DDP. It is not a buffer: DDP broadcasts buffers from rank 0 at every forward,
    which would overwrite each rank's own sums between the micro-batches of a step, and
    a checkpoint is taken between steps.
    """

    def __init__(self, dim: int, partitions: int, rho: float, zero_mean: bool) -> None:
        self.dim, self.partitions, self.rho, self.zero_mean = dim, partitions, rho, zero_mean
        halves = max(1, 2 * partitions)
        self.stack = (2 * partitions,) if partitions else ()
        self.sizes = (halves * dim * dim, halves * dim, halves, partitions)
        self.moments = torch.zeros(sum(self.sizes))

    def views(self) -> Moments:
        gram, total, count, projections = self.moments.split(self.sizes)
        d = self.dim
        return Moments(gram.view(*self.stack, d, d), total.view(*self.stack, d), count.view(self.stack), projections)

    def to(self, device: torch.device) -> None:
        """Follow the module to ``device`` (the accumulator stays float32)."""
        self.moments = self.moments.to(device=device, dtype=torch.float32)

    def clear(self) -> None:
        self.moments.zero_()

    @torch.no_grad()
    def record(self, x: Tensor, masks: Tensor | None, projections: Tensor | None, backend: Backend | str) -> None:
        """Add one call's batch moments (traceable under torch.compile; no host sync).

        Nothing is judged here: a call with non-finite features (or features whose x^T x
        overflows float32) leaves non-finite sums, and the fold skips that step.
        """
        if x.shape[0] == 0:
            return
        acc = self.views()
        functional.add_moments_(acc.gram, acc.total, acc.count, x, masks, backend=backend)
        if projections is not None:
            acc.projections.add_(projections.sum(0))

    @torch.no_grad()
    def fold(self, running: RunningStatistics, synced: bool, backend: Backend | str = "auto") -> None:
        """Fold the accumulated moments into ``running`` as one batch (Eq. 19) and clear them.

        Under DDP (``synced``) the sums are all-reduced first (every rank takes part, also
        with N = 0). The step is judged by its own statistics, after the all-reduce so that
        every rank decides alike: a step whose moments are not all finite (a non-finite
        feature, or an x^T x that overflows float32, which no feature threshold predicts
        for a large N) leaves every statistic unchanged and is counted in
        ``num_skipped``; an F whose half received no sample keeps its value. All decided
        on the device.
        """
        if synced:
            dist.all_reduce(self.moments)
        acc = self.views()
        first = running.folded == 0
        weight, usable = functional.fold_moments_(
            running.corr, acc.gram, acc.total, acc.count, self.rho, first=first,
            mean=running.mean if self.zero_mean else None, backend=backend)
        if running.thresholds is not None:
            # The projections are finite wherever x^T x is (|x| < 1.8e19 then, the planes unit vectors).
            samples = acc.count[0] + acc.count[1]  # every sample is above or below hyperplane 0
            threshold_weight = functional.ema_weight(self.rho, first=first.all(), fold=(samples > 0) & usable)
            functional.ema_(running.thresholds, acc.projections / samples.clamp(min=1), threshold_weight)
        running.folded.add_(weight > 0)
        running.num_skipped.add_(~usable)
        self.clear()
