"""Rebuilds of W_p computed off the critical path: on a side CUDA stream or a worker thread.

:func:`start_rebuild` launches ``compute(corr)`` and returns a :class:`PendingRebuild`;
its :meth:`~PendingRebuild.collect` gives W_p (or raises the rebuild's
:class:`~fastpred.eigh.EighError`) once the caller needs it. The result is the
same as calling ``compute(corr)`` directly: only where it runs differs. When a rebuild
starts and where it is collected is decided by :mod:`fastpred.schedule`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch
from torch import Tensor

from .eigh import EighError

Compute = Callable[[Tensor], Tensor]

_worker: ThreadPoolExecutor | None = None  # one thread for every CPU rebuild
_side_streams: dict[torch.device, "torch.cuda.Stream"] = {}  # one side stream per GPU


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

    def __init__(self, weight: Tensor | None, error: EighError | None, done: "torch.cuda.Event") -> None:
        self.weight, self.error, self.done = weight, error, done

    def collect(self) -> Tensor:
        if self.error is not None:
            raise self.error
        torch.cuda.current_stream(self.weight.device).wait_event(self.done)
        return self.weight


def start_rebuild(compute: Compute, corr: Tensor) -> PendingRebuild:
    """Start ``compute(corr)`` off the critical path.

    ``corr`` must be the caller's own copy (nothing else may write to it). On CUDA the
    work is enqueued on a side stream after everything already on the current stream;
    on CPU it runs on the worker thread.
    """
    if corr.is_cuda:
        return start_on_stream(compute, corr, side_stream(corr.device))
    global _worker
    if _worker is None:
        _worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastpred-rebuild")
    return ThreadRebuild(_worker.submit(compute, corr))


def side_stream(device: torch.device) -> "torch.cuda.Stream":
    """The side stream of ``device``, shared by every predictor on it (kept here, not in
    the module, so that a predictor stays picklable)."""
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


def start_on_stream(compute: Compute, corr: Tensor, side: "torch.cuda.Stream") -> StreamRebuild:
    """Enqueue ``compute(corr)`` on ``side`` after the work already on the current stream."""
    main = torch.cuda.current_stream(corr.device)
    side.wait_stream(main)  # F is complete before the side stream reads it
    weight = error = None
    with torch.cuda.stream(side):
        try:
            weight = compute(corr)
        except EighError as err:
            error = err
        done = torch.cuda.Event()
        done.record(side)
    # corr was allocated on the main stream and is read by side-stream kernels that may
    # not have run when the caller drops it: without this the caching allocator could
    # hand its memory to the backward pass first.
    corr.record_stream(side)
    if weight is not None:
        weight.record_stream(main)  # made on the side stream, used (and freed) on the main one
    return StreamRebuild(weight, error, done)
