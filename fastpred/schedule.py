"""When W_p is re-set from F, and where that rebuild runs (Eq. 18 every ``freq`` steps).

A step that folds a batch makes a rebuild due every ``freq`` steps (the first step
included), so that the W_p of the next step includes this batch. The rebuild then
runs at once, is left owed until the caller's next safe point (the per-call mode with
``freq > 1``, where the optimizer step that follows would otherwise train the new
W_p), or runs off the critical path (``async_rebuild``: :mod:`fastpred.async_rebuild`),
to be collected at that point. The solver's state (the closed form's top eigenvector)
is primed at the first rebuild.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor

from .async_rebuild import PendingRebuild, start_rebuild

Compute = Callable[[Tensor], Tensor]


class RebuildSchedule:
    """The rebuild timing of one predictor: due, owed, in flight."""

    def __init__(self, freq: int, async_rebuild: bool) -> None:
        self.freq, self.async_rebuild = freq, async_rebuild
        self.owed = False  # a rebuild is due at the next safe point
        self.pending: PendingRebuild | None = None  # an async rebuild in flight
        self.primed = False  # the solver's state holds a previous result

    def due(self, steps: int) -> bool:
        """Whether step number ``steps`` (1-based) re-sets W_p."""
        return (steps - 1) % self.freq == 0

    @property
    def waiting(self) -> bool:
        """A rebuild is owed or in flight."""
        return self.owed or self.pending is not None

    def after_fold(self, steps: int, compute: Compute, target: Callable[[], Tensor], *, defer: bool) -> Tensor | None:
        """Step ``steps`` has folded its batch: the W_p to install now, or None (not due,
        owed with ``defer``, or started asynchronously). Raises the rebuild's EighError."""
        if not self.due(steps):
            return None
        if self.async_rebuild:
            # F as of this step, copied: the next fold must not change what the rebuild reads.
            self.pending = start_rebuild(compute, target().clone())
            return None
        if defer:
            self.owed = True
            return None
        self.owed = False
        return compute(target())

    def take(self, compute: Compute, target: Callable[[], Tensor]) -> Tensor | None:
        """The rebuild left for this point: a finished async one, or the owed one computed
        now; None when there is none. Raises the rebuild's EighError."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            return pending.collect()
        if self.owed:
            self.owed = False
            return compute(target())
        return None

    def drop(self) -> None:
        """Forget what is owed or in flight (a load replaced F and W_p)."""
        self.owed, self.pending = False, None

    def __getstate__(self) -> dict:
        # A rebuild in flight belongs to this process: a copy redoes it from the same F.
        state = dict(self.__dict__)
        state["owed"] = self.owed or self.pending is not None
        state["pending"] = None
        return state
