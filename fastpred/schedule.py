"""When W_p is re-set from F, and where that rebuild runs: fastpred's one async module.

A step that folds a batch makes a rebuild due every ``freq`` steps (the first step
included), so that the W_p of the next step includes this batch (Eq. 18 every ``freq``
steps). The rebuild then runs at once, is left owed until the caller's next safe point
(the per-call mode with ``freq > 1``, where the optimizer step that follows would
otherwise train the new W_p), or runs off the critical path (``async_rebuild``), to be
collected at that point. The solver's state (the closed form's top eigenvector) is
primed at the first rebuild.

Everything asynchronous in fastpred is here, and every stream and event it touches
goes through one seam, :data:`STREAMS` (:class:`CudaStreams`), which a test can replace
to run these paths without a GPU (tests/test_fake_cuda.py):

- :func:`start_rebuild`: ``compute(corr)`` on a side CUDA stream (the host never waits;
  :meth:`PendingRebuild.collect` makes the current stream wait on an event) or, on CPU,
  on a worker thread;
- :class:`HostCopy`: a device tensor copied to pinned host memory without waiting, read
  once an event says it has landed (the GPU eigensolver's ``info``, the warm solver's
  refresh flag).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, ContextManager

import torch
from torch import Tensor

from .eigh import EighError

Compute = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------- the seam
class CudaStreams:
    """The CUDA stream and event operations of this module, and nothing else.

    On a GPU these are torch.cuda's own; a test swaps :data:`STREAMS` for a stand-in
    with the same methods (fake tensors carry no stream), so the code around them runs
    unchanged. One side stream per device, shared by every predictor on it (kept here,
    not in a module, so that a predictor stays picklable).
    """

    def __init__(self) -> None:
        self._side: dict[torch.device, Any] = {}

    def current(self, device: torch.device) -> Any:
        return torch.cuda.current_stream(device)

    def side(self, device: torch.device) -> Any:
        if device not in self._side:
            self._side[device] = torch.cuda.Stream(device)
        return self._side[device]

    def using(self, stream: Any) -> ContextManager:
        return torch.cuda.stream(stream)

    def event(self) -> Any:
        return torch.cuda.Event()

    def record_stream(self, tensor: Tensor, stream: Any) -> None:
        tensor.record_stream(stream)

    def pinned_like(self, tensor: Tensor) -> Tensor:
        return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)


STREAMS = CudaStreams()
_worker: ThreadPoolExecutor | None = None  # one thread for every CPU rebuild


# ------------------------------------------------------------------- host copies
class HostCopy:
    """A device tensor on its way to pinned host memory: the copy is enqueued on the
    tensor's current stream with an event after it; :meth:`ready` asks the event (never
    waits), :meth:`wait` waits for it and gives the host tensor."""

    def __init__(self, value: Tensor) -> None:
        stream = STREAMS.current(value.device)  # the tensor's device's stream, not the current device's
        self.host = STREAMS.pinned_like(value)
        with STREAMS.using(stream):
            self.host.copy_(value, non_blocking=True)
        self.event = STREAMS.event()
        self.event.record(stream)

    def ready(self) -> bool:
        return bool(self.event.query())

    def wait(self) -> Tensor:
        self.event.synchronize()
        return self.host


# --------------------------------------------------------------- async rebuilds
class PendingRebuild(ABC):
    """A rebuild in flight."""

    @abstractmethod
    def collect(self) -> Tensor:
        """W_p, ready for use on the current stream.

        Raises:
            EighError: the eigendecomposition failed (the caller keeps the previous W_p).
        """


class ThreadRebuild(PendingRebuild):
    """A CPU rebuild on the worker thread; :meth:`collect` waits for it on the host."""

    def __init__(self, future: Future) -> None:
        self.future = future

    def collect(self) -> Tensor:
        return self.future.result()


class StreamRebuild(PendingRebuild):
    """A CUDA rebuild enqueued on a side stream; :meth:`collect` makes the current stream
    wait for it (the host never waits)."""

    def __init__(self, weight: Tensor | None, error: EighError | None, done: Any) -> None:
        self.weight, self.error, self.done = weight, error, done

    def collect(self) -> Tensor:
        if self.error is not None:
            raise self.error
        STREAMS.current(self.weight.device).wait_event(self.done)
        return self.weight


def start_rebuild(compute: Compute, corr: Tensor) -> PendingRebuild:
    """Start ``compute(corr)`` off the critical path; the result is the same as calling
    ``compute(corr)`` directly, only where it runs differs.

    ``corr`` must be the caller's own copy (nothing else may write to it). On CUDA the
    work is enqueued on a side stream after everything already on the current stream;
    on CPU it runs on the worker thread.
    """
    if corr.is_cuda:
        return start_on_stream(compute, corr, STREAMS.side(corr.device))
    global _worker
    if _worker is None:
        _worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastpred-rebuild")
    return ThreadRebuild(_worker.submit(compute, corr))


def start_on_stream(compute: Compute, corr: Tensor, side: Any) -> StreamRebuild:
    """Enqueue ``compute(corr)`` on ``side`` after the work already on the current stream."""
    main = STREAMS.current(corr.device)
    side.wait_stream(main)  # F is complete before the side stream reads it
    weight = error = None
    with STREAMS.using(side):
        try:
            weight = compute(corr)
        except EighError as err:
            error = err
        done = STREAMS.event()
        done.record(side)
    # corr was allocated on the main stream and is read by side-stream kernels that may
    # not have run when the caller drops it: without this the caching allocator could
    # hand its memory to the backward pass first.
    STREAMS.record_stream(corr, side)
    if weight is not None:
        STREAMS.record_stream(weight, main)  # made on the side stream, used (and freed) on the main one
    return StreamRebuild(weight, error, done)


# --------------------------------------------------------------------- schedule
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
