"""The GPU eigensolver's driver: everything around the cuSOLVER calls, with the calls injected.

It is written against a small array namespace (:class:`ArrayOps`), so the same code
runs with torch CUDA tensors in the GPU backends (:class:`TorchCudaOps`) and with
NumPy arrays in CI (``tests/numpy_ops.py``), where the solvers are NumPy stand-ins
with injected failures. What it does:

* **Workspace caching.** A solver's device and host workspaces, and the query of
  their sizes, are made once per (solver, n, batch, dtype, stream) and reused; the
  least recently used entries beyond ``max_cached`` are dropped. A steady training
  loop therefore allocates nothing here (and can be captured in a CUDA graph).
* **Batching.** A stack of matrices goes to a batched solver (cuSOLVER's
  ``XsyevBatched``) in chunks with ``n * n * chunk <= INT32_MAX``, cuSOLVER's limit;
  a single matrix goes to the per-matrix solver (``Xsyevd``).
* **Routing.** Solvers are tried in the order given, each within its limits (the
  Jacobi batched solver only for ``n <= 32``); one that refuses when called (a
  library too old, an unsupported size: nothing ran) is not asked again for that
  (n, dtype), with a warning, and the next one takes the same chunk. When none can
  run a call, it raises: retrying (in float64, then the reference) is the one retry
  chain's job, :func:`fastpred.eigh.symmetric_eigh`, which calls this driver again
  with a float64 matrix.
* **Failures become NaN, on the device.** cuSOLVER reports per-matrix failure in
  ``info``, on the device. Reading it at once would stall the host every step
  (``torch.linalg.eigh`` does). Instead, still on the device, the eigenvalues of a
  matrix whose ``info`` is nonzero are set to NaN, so that whatever is built from
  them (W_p) is NaN too and a device-side finiteness check (the predictor's) rejects
  it in the same step. For the record, each call also starts an asynchronous copy of
  ``info`` to pinned host memory, and a later call inspects it once the copy has
  landed (an event query, never a wait): a failure found that way is warned about
  (RuntimeWarning, and ``stats.failures``) and matrices of that size are decomposed
  in float64 from then on. :meth:`EighDriver.check` waits for everything
  outstanding and returns the failures (tests, the end of a run). During CUDA-graph
  capture no copy is started; the captured ``info`` buffers are kept and
  :meth:`EighDriver.check` reads them after replays.

The solvers' in-place contract (that of ``torch.ops.fastpred.syevd_``): ``a`` is
``(batch, n, n)`` row-major with its lower triangle read; row ``j`` of ``a[b]``
receives eigenvector ``j``; ``w`` ``(batch, n)`` the eigenvalues in ascending
order; ``info`` ``(batch,)`` int32, nonzero for a failed matrix. The driver returns
eigenvectors in columns (``a.mT``), as ``torch.linalg.eigh`` does.
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Protocol, Sequence

import numpy as np

from .._stack import user_stacklevel

INT32_MAX = 2**31 - 1

Array = Any  # an array of the ArrayOps' library (torch.Tensor, numpy.ndarray)


# ----------------------------------------------------------------- namespaces
class Pending(Protocol):
    """An asynchronous device-to-host copy of an ``info`` array."""

    def ready(self) -> bool:
        """Whether the copy has landed (never waits)."""

    def wait(self) -> Any:
        """The host values (an array NumPy reads), waiting for the copy if needed."""


class ArrayOps(Protocol):
    """The few array operations the driver needs, for one device."""

    float32: Any
    float64: Any
    int32: Any

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Array: ...

    def empty_host(self, nbytes: int) -> Array:
        """A host uint8 buffer (cuSOLVER's host workspace)."""

    def empty_device_bytes(self, nbytes: int) -> Array:
        """A device uint8 buffer (cuSOLVER's device workspace)."""

    def copy_as(self, a: Array, shape: tuple[int, ...], dtype: Any) -> Array:
        """A new contiguous array of ``shape`` and ``dtype`` holding a's values."""

    def cast(self, a: Array, dtype: Any) -> Array: ...

    def dtype_of(self, a: Array) -> Any: ...

    def transpose(self, a: Array) -> Array:
        """Swap the last two axes (a view)."""

    def mark_failed(self, w: Array, info: Array) -> None:
        """Set ``w[b, :]`` to NaN where ``info[b] != 0``, in place, without reading
        ``info`` on the host."""

    def start_to_host(self, info: Array) -> Pending:
        """Begin copying ``info`` to the host without waiting."""

    def capturing(self) -> bool:
        """Whether a CUDA graph is being captured on the current stream."""

    def stream_key(self) -> Hashable:
        """Identifies the current stream (workspaces are not shared across streams)."""


@dataclass(frozen=True)
class Solver:
    """One eigensolver routine, as the driver calls it.

    Attributes:
        name: for messages and statistics.
        run: ``run(a, w, info, work_device, work_host)`` enqueues the
            decomposition of the stack ``a`` in place (see the module doc).
        workspace_size: ``workspace_size(a, w) -> (device_bytes, host_bytes)`` for
            that ``run`` (``a``, ``w`` are the arrays it will get).
        batched: one library call for the whole stack (chunked under the INT32
            limit); otherwise ``run`` goes matrix by matrix and its workspace is
            that of one matrix.
        max_n: the largest n it accepts (cuSOLVER's syevjBatched: 32), or None.
    """

    name: str
    run: Callable[[Array, Array, Array, Array, Array], None]
    workspace_size: Callable[[Array, Array], tuple[int, int]]
    batched: bool = False
    max_n: int | None = None


@dataclass
class _Workspace:
    device: Array
    host: Array


@dataclass
class _Check:
    call: int
    n: int
    dtype: Any
    solvers: tuple[str, ...]
    pending: Pending | None = None
    info: Array | None = None  # kept instead of a copy during graph capture


@dataclass
class DriverStats:
    """Counters of one driver (for tests, benchmarks and the GPU report)."""

    calls: int = 0
    solver_calls: dict[str, int] = field(default_factory=dict)
    workspace_allocations: int = 0
    failures: list[str] = field(default_factory=list)
    unchecked: int = 0
    disabled: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------- driver
class EighDriver:
    """Symmetric eigendecomposition through injected solvers (see the module doc).

    Args:
        ops: the array namespace of the device.
        solvers: in order of preference; batched ones are used for stacks only, the
            first non-batched one that fits for single matrices (and for stacks no
            batched solver takes).
        int32_limit: the bound on ``n * n * chunk`` of one batched call.
        max_cached: workspaces kept (least recently used dropped first).
        max_pending: info checks in flight; beyond it a call goes unchecked (and is
            counted in ``stats.unchecked``) rather than waiting (its failures still
            come out as NaN eigenvalues).
    """

    def __init__(
        self,
        ops: ArrayOps,
        solvers: Sequence[Solver],
        *,
        int32_limit: int = INT32_MAX,
        max_cached: int = 16,
        max_pending: int = 64,
    ) -> None:
        if not solvers:
            raise ValueError("solvers must name at least one solver")
        self.ops = ops
        self.solvers = tuple(solvers)
        self.int32_limit = int(int32_limit)
        self.max_cached = int(max_cached)
        self.max_pending = int(max_pending)
        self.stats = DriverStats()
        self._workspaces: OrderedDict[tuple, _Workspace] = OrderedDict()
        self._pending: deque[_Check] = deque()
        self._captured: list[_Check] = []
        self._disabled: dict[tuple[str, int, Any], str] = {}
        self._float64_sizes: set[int] = set()

    # -------------------------------------------------------------- public
    def eigh(self, a: Array) -> tuple[Array, Array]:
        """Eigenvalues (ascending) and eigenvectors (columns) of the stack ``a`` (..., n, n).

        Enqueued, not waited for. Results have a's dtype (float32 for other
        floating dtypes). A matrix the solver failed on gets NaN eigenvalues.

        Warns:
            RuntimeWarning: an *earlier* call's ``info``, landed since, showed a failure.

        Raises:
            RuntimeError: no solver could be called for this input in its dtype (the
                caller's retry chain, :func:`fastpred.eigh.symmetric_eigh`, goes on).
        """
        self.poll()
        shape = tuple(a.shape)
        if len(shape) < 2 or shape[-1] != shape[-2]:
            raise ValueError(f"a must be (..., n, n), got shape {shape}")
        n = shape[-1]
        batch = math.prod(shape[:-2])
        in_dtype = self.ops.dtype_of(a)
        out_dtype = in_dtype if in_dtype in (self.ops.float32, self.ops.float64) else self.ops.float32
        dtype = self.ops.float64 if out_dtype == self.ops.float64 or n in self._float64_sizes else out_dtype
        self.stats.calls += 1
        try:
            w, vecs = self._solve(a, n, batch, dtype)
        except RuntimeError as err:
            raise RuntimeError(f"fastpred GPU eigh: no eigensolver succeeded: {_dtype_name(dtype)}: {err}") from None
        if dtype != out_dtype:
            w, vecs = self.ops.cast(w, out_dtype), self.ops.cast(vecs, out_dtype)
        return (w.reshape(shape[:-1]), self.ops.transpose(vecs.reshape(shape)))

    def poll(self) -> None:
        """Inspect the info copies that have landed; report a failure among them."""
        if self.ops.capturing():
            return  # event queries are not allowed while a graph is captured
        found = []
        while self._pending and self._pending[0].pending.ready():
            check = self._pending.popleft()
            found += self._inspect(check, check.pending.wait())
        self._report(found)

    def check(self) -> list[str]:
        """Wait for every outstanding info check (a host sync); warn about and return
        the failures found (empty when every decomposition succeeded)."""
        found = []
        while self._pending:
            check = self._pending.popleft()
            found += self._inspect(check, check.pending.wait())
        for check in self._captured:
            found += self._inspect(check, self.ops.start_to_host(check.info).wait())
        self._report(found)
        return found

    # ------------------------------------------------------------- solving
    def _solve(self, a: Array, n: int, batch: int, dtype: Any) -> tuple[Array, Array]:
        buf = self.ops.copy_as(a, (batch, n, n), dtype)  # the solvers' input and output
        w = self.ops.empty((batch, n), dtype)
        info = self.ops.empty((batch,), self.ops.int32)
        used: list[str] = []
        start = 0
        while start < batch:
            solver, count = self._pick(n, batch - start, dtype)
            stop = start + count
            a_c, w_c, info_c = buf[start:stop], w[start:stop], info[start:stop]
            try:
                work = self._workspace(solver, a_c, w_c, n, count, dtype)
                solver.run(a_c, w_c, info_c, work.device, work.host)
            except RuntimeError as err:
                # Nothing ran for this chunk (the solver refused it): the next one takes it.
                self._disable(solver, n, dtype, err)
                continue
            self.stats.solver_calls[solver.name] = self.stats.solver_calls.get(solver.name, 0) + 1
            used.append(solver.name)
            start = stop
        if batch:
            self.ops.mark_failed(w, info)
            self._track(info, n, dtype, tuple(used))
        return w, buf

    def _pick(self, n: int, remaining: int, dtype: Any) -> tuple[Solver, int]:
        """The first usable solver for the next chunk, and the chunk's size."""
        reasons = []
        for solver in self.solvers:
            if (solver.name, n, dtype) in self._disabled:
                reasons.append(f"{solver.name} disabled ({self._disabled[solver.name, n, dtype]})")
                continue
            if solver.max_n is not None and n > solver.max_n:
                continue
            if not solver.batched:
                return solver, remaining
            if remaining < 2:
                continue  # a single matrix goes to the per-matrix solver
            chunk = min(remaining, self.int32_limit // max(1, n * n))
            if chunk >= 2:
                return solver, chunk
        raise RuntimeError(f"no usable eigensolver for n={n}, {_dtype_name(dtype)}"
                           + (": " + "; ".join(reasons) if reasons else ""))

    def _workspace(self, solver: Solver, a: Array, w: Array, n: int, count: int, dtype: Any) -> _Workspace:
        key = (solver.name, n, count if solver.batched else 1, _dtype_name(dtype), self.ops.stream_key())
        work = self._workspaces.get(key)
        if work is not None:
            self._workspaces.move_to_end(key)
            return work
        query_a, query_w = (a, w) if solver.batched else (a[:1], w[:1])
        device_bytes, host_bytes = solver.workspace_size(query_a, query_w)
        work = _Workspace(self.ops.empty_device_bytes(int(device_bytes)), self.ops.empty_host(int(host_bytes)))
        self.stats.workspace_allocations += 1
        self._workspaces[key] = work
        while len(self._workspaces) > self.max_cached:
            self._workspaces.popitem(last=False)
        return work

    def _disable(self, solver: Solver, n: int, dtype: Any, err: Exception) -> None:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        self._disabled[solver.name, n, dtype] = reason
        self.stats.disabled[f"{solver.name}/n={n}/{_dtype_name(dtype)}"] = reason
        warnings.warn(f"fastpred GPU eigh: {solver.name} failed for n={n} ({reason}); "
                      "using the next solver from now on", RuntimeWarning, stacklevel=user_stacklevel())

    # ---------------------------------------------------------- info checks
    def _track(self, info: Array, n: int, dtype: Any, solvers: tuple[str, ...]) -> None:
        check = _Check(self.stats.calls, n, dtype, solvers)
        if self.ops.capturing():
            check.info = info  # read by check() after the graph has run
            self._captured.append(check)
        elif len(self._pending) >= self.max_pending:
            self.stats.unchecked += 1
        else:
            check.pending = self.ops.start_to_host(info)
            self._pending.append(check)

    def _inspect(self, check: _Check, info: np.ndarray) -> list[str]:
        bad = np.flatnonzero(np.asarray(info))
        if bad.size == 0:
            return []
        if check.dtype == self.ops.float32:
            self._float64_sizes.add(check.n)  # from now on, this size in float64
        shown = ", ".join(f"matrix {int(i)}: info={int(np.asarray(info)[i])}" for i in bad[:4])
        more = f" and {bad.size - 4} more" if bad.size > 4 else ""
        message = (f"call {check.call} ({'+'.join(check.solvers)}, n={check.n}, {_dtype_name(check.dtype)}) "
                   f"failed for {bad.size} matrix(es): {shown}{more}")
        self.stats.failures.append(message)
        return [message]

    def _report(self, found: list[str]) -> None:
        if not found:
            return
        message = ("fastpred GPU eigh: cuSOLVER reported failure (found after the call; its eigenvalues "
                   "were NaN): " + "; ".join(found) + ". That size is decomposed in float64 from now on.")
        warnings.warn(message, RuntimeWarning, stacklevel=user_stacklevel())


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


# ------------------------------------------------------------------- torch
class TorchCudaOps:
    """:class:`ArrayOps` over torch tensors on one CUDA device, on the current stream.

    ``info`` goes to pinned host memory through :class:`fastpred.schedule.HostCopy`
    (a non-blocking copy followed by an event; ``ready()`` is an event query). No call here synchronizes the host except
    ``Pending.wait`` (used by ``EighDriver.check`` only).
    """

    def __init__(self, device) -> None:
        import torch

        self._torch = torch
        self.device = torch.device(device)
        self.float32, self.float64, self.int32 = torch.float32, torch.float64, torch.int32

    def empty(self, shape, dtype):
        return self._torch.empty(shape, dtype=dtype, device=self.device)

    def empty_host(self, nbytes):
        return self._torch.empty(nbytes, dtype=self._torch.uint8)

    def empty_device_bytes(self, nbytes):
        return self._torch.empty(nbytes, dtype=self._torch.uint8, device=self.device)

    def copy_as(self, a, shape, dtype):
        out = self._torch.empty(shape, dtype=dtype, device=self.device)
        out.copy_(a.reshape(shape))
        return out

    def cast(self, a, dtype):
        return a.to(dtype)

    def dtype_of(self, a):
        return a.dtype

    def transpose(self, a):
        return a.mT

    def mark_failed(self, w, info):
        w.masked_fill_(info.ne(0).unsqueeze(-1), float("nan"))

    def start_to_host(self, info):
        from ..schedule import HostCopy  # fastpred's one pinned-memory copy (its streams: a seam)

        return HostCopy(info)

    def capturing(self):
        with self._torch.cuda.device(self.device):  # this device's current stream
            return self._torch.cuda.is_current_stream_capturing()

    def stream_key(self):
        return self._torch.cuda.current_stream(self.device).cuda_stream


_drivers: dict[tuple, EighDriver] = {}


def device_driver(device, backend: str, make_solvers: Callable[[], Sequence[Solver]]) -> EighDriver:
    """The one :class:`EighDriver` of ``backend`` (``"csrc"``, ``"cupy"``) on a CUDA
    ``device``, created on first use with :class:`TorchCudaOps` and ``make_solvers()``.

    One cache for every backend, so each (device, backend) keeps one set of
    workspaces and one record of failures; ``.check()`` reports pending failures.
    """
    import torch

    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device, backend)
    if key not in _drivers:
        _drivers[key] = EighDriver(TorchCudaOps(device), make_solvers())
    return _drivers[key]
