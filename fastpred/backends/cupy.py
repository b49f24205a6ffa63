"""``backend="cupy"``: the eigendecomposition through cuSOLVER, via CuPy's low-level bindings.

Install with ``pip install 'fastpred[cuda]'`` (CuPy for CUDA 13). Only ``eigh`` is
provided here (the other steps stay with the reference or another backend). What it
does differently from ``torch.linalg.eigh`` and ``cupy.linalg.eigh``:

* a single matrix goes to cuSOLVER's divide-and-conquer ``Xsyevd`` through
  ``cupy_backends.cuda.libs.cusolver`` (not ``cupy.linalg.eigh``, which queries and
  allocates workspaces and copies its input on every call); the workspaces are
  cached by :mod:`fastpred.backends.eigh_driver`, per (solver, n, batch, dtype, stream), the
  stream being torch's current one (a workspace in use on one stream is never
  handed to a call on another);
* a stack goes to the batched divide-and-conquer ``XsyevBatched`` (cuSOLVER >=
  11.7.1), which CuPy does not wrap: the binding is csrc's ``syevd_batched_`` op.
  Without it (an older library, or ``fastpred._C`` not built with CUDA): CuPy's
  Jacobi ``syevjBatched`` for n <= 32, then ``Xsyevd`` matrix by matrix;
* float32 first, float64 when float32 fails; ``info`` is checked lazily, without
  a host sync per call (see :mod:`fastpred.backends.eigh_driver`).

Zero copy, torch's stream: the cuSOLVER routines receive the device pointers of
torch tensors (allocated by torch's caching allocator), so no array changes hands
and no DLPack capsule is built per call; every call runs inside a CuPy stream
wrapping torch's current stream (``cupy.cuda.Stream.from_external``; CuPy's bindings
bind the handle to CuPy's current stream). :func:`as_cupy` / :func:`as_torch` convert through
DLPack for callers that want CuPy arrays.
"""
from __future__ import annotations

import threading

import torch
from torch import Tensor

try:
    import cupy
    from cupy_backends.cuda.libs import cublas as _cublas
    from cupy_backends.cuda.libs import cusolver as _cusolver
except ImportError as err:  # the dispatch point turns this into "install fastpred[cuda]"
    raise ImportError(f"CuPy is not installed or does not load ({err})") from err

from .eigh_driver import EighDriver, Solver, device_driver

__all__ = ["eigh", "supports", "eigh_driver", "as_cupy", "as_torch"]

# cudaDataType values (library_types.h), stable across CUDA versions.
_CUDA_TYPE = {torch.float32: 0, torch.float64: 1}  # CUDA_R_32F, CUDA_R_64F
_JOBZ = _cusolver.CUSOLVER_EIG_MODE_VECTOR
# Row-major storage of a[b] is the column-major a[b]^T: its upper triangle is a's
# lower one, and column j of the result (row j of a[b]) is eigenvector j.
_UPLO = _cublas.CUBLAS_FILL_MODE_UPPER
_SYEVJ_MAX_N = 32  # cuSOLVER's syevjBatched limit


def supports(device: torch.device) -> bool:
    """CUDA devices, when a GPU is present (CuPy imported)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available()


def as_cupy(tensor: Tensor) -> "cupy.ndarray":
    """A CuPy view of a CUDA tensor (DLPack, zero copy; ordered on torch's current stream)."""
    return cupy.from_dlpack(tensor)


def as_torch(array: "cupy.ndarray") -> Tensor:
    """A torch view of a CuPy array (DLPack, zero copy)."""
    return torch.from_dlpack(array)


# ------------------------------------------------------------ CuPy context
class _Context:
    """CuPy's cuSOLVER handle and params for one device and thread, on torch's stream.

    Per thread, as cuSOLVER handles are not thread-safe (CuPy keeps its handles per
    thread too).
    """

    def __init__(self, index: int) -> None:
        self.index = index
        with cupy.cuda.Device(index):
            self.handle = cupy.cuda.device.get_cusolver_handle()
            self.params = _cusolver.createParams()
            self.syevj = _cusolver.createSyevjInfo()
            _cusolver.xsyevjSetSortEig(self.syevj, 1)  # ascending, as syevd
        self._streams: dict[int, object] = {}

    def stream(self):
        """A CuPy stream wrapping torch's current stream, to enter with ``with``."""
        ptr = torch.cuda.current_stream(self.index).cuda_stream
        stream = self._streams.get(ptr)
        if stream is None:
            if len(self._streams) > 32:
                self._streams.clear()
            stream = self._streams[ptr] = _external_stream(ptr, self.index)
        return stream


class _StreamHandle:
    """A raw CUDA stream handle under the CUDA stream protocol (``__cuda_stream__``)."""

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return 0, self.ptr  # (protocol version, cudaStream_t)


def _external_stream(ptr: int, index: int):
    """``cupy.cuda.Stream.from_external`` (CuPy >= 14), else the older ``ExternalStream``
    (deprecated in CuPy 14)."""
    if hasattr(cupy.cuda.Stream, "from_external"):
        with cupy.cuda.Device(index):
            return cupy.cuda.Stream.from_external(_StreamHandle(ptr))
    return cupy.cuda.ExternalStream(ptr, index)


_local = threading.local()


def _context(tensor: Tensor) -> _Context:
    contexts = getattr(_local, "contexts", None)
    if contexts is None:
        contexts = _local.contexts = {}
    index = tensor.device.index
    ctx = contexts.get(index)
    if ctx is None:
        ctx = contexts[index] = _Context(index)
    return ctx


def _call(fn, *args):
    """Run a CuPy binding, turning its CUDA errors into RuntimeError (the driver's fallback signal)."""
    try:
        return fn(*args)
    except RuntimeError:
        raise
    except Exception as err:  # CuPy's CUSOLVERError and friends
        raise RuntimeError(f"{type(err).__name__}: {err}") from err


def _host_ptr(work_host: Tensor) -> int:
    return work_host.data_ptr() if work_host.numel() else 0


# ---------------------------------------------------------------- solvers
def _xsyevd_size(a: Tensor, w: Tensor) -> tuple[int, int]:
    ctx, n, t = _context(a), a.shape[-1], _CUDA_TYPE[a.dtype]
    with cupy.cuda.Device(ctx.index), ctx.stream():
        sizes = _call(_cusolver.xsyevd_bufferSize, ctx.handle, ctx.params, _JOBZ, _UPLO, n, t, a.data_ptr(), n, t,
                      w.data_ptr(), t)
    return int(sizes[0]), int(sizes[1])


def _xsyevd_run(a: Tensor, w: Tensor, info: Tensor, work_device: Tensor, work_host: Tensor) -> None:
    ctx, n, t = _context(a), a.shape[-1], _CUDA_TYPE[a.dtype]
    with cupy.cuda.Device(ctx.index), ctx.stream():
        for b in range(a.shape[0]):
            _call(_cusolver.xsyevd, ctx.handle, ctx.params, _JOBZ, _UPLO, n, t, a[b].data_ptr(), n, t,
                  w[b].data_ptr(), t, work_device.data_ptr(), work_device.numel(), _host_ptr(work_host),
                  work_host.numel(), info[b].data_ptr())


def _syevj_batched_fns(dtype: torch.dtype):
    if dtype == torch.float32:
        return _cusolver.ssyevjBatched_bufferSize, _cusolver.ssyevjBatched
    return _cusolver.dsyevjBatched_bufferSize, _cusolver.dsyevjBatched


def _syevj_batched_size(a: Tensor, w: Tensor) -> tuple[int, int]:
    ctx, (batch, n) = _context(a), (a.shape[0], a.shape[-1])
    size_fn, _ = _syevj_batched_fns(a.dtype)
    with cupy.cuda.Device(ctx.index), ctx.stream():
        lwork = _call(size_fn, ctx.handle, _JOBZ, _UPLO, n, a.data_ptr(), n, w.data_ptr(), ctx.syevj, batch)
    return int(lwork) * a.element_size(), 0


def _syevj_batched_run(a: Tensor, w: Tensor, info: Tensor, work_device: Tensor, work_host: Tensor) -> None:
    ctx, (batch, n) = _context(a), (a.shape[0], a.shape[-1])
    _, run_fn = _syevj_batched_fns(a.dtype)
    with cupy.cuda.Device(ctx.index), ctx.stream():
        _call(run_fn, ctx.handle, _JOBZ, _UPLO, n, a.data_ptr(), n, w.data_ptr(), work_device.data_ptr(),
              work_device.numel() // a.element_size(), info.data_ptr(), ctx.syevj, batch)


def cuda_solvers() -> list[Solver]:
    """In order of preference: csrc's XsyevBatched (if built), CuPy's syevjBatched (n <= 32), Xsyevd."""
    solvers = []
    try:
        from . import csrc

        if csrc.built_with_cuda():
            solvers += [s for s in csrc.cuda_solvers() if s.batched]
    except ImportError:
        pass  # fastpred._C not built: no batched divide-and-conquer
    solvers.append(Solver("cupy.syevjBatched", _syevj_batched_run, _syevj_batched_size, batched=True,
                          max_n=_SYEVJ_MAX_N))
    solvers.append(Solver("cupy.Xsyevd", _xsyevd_run, _xsyevd_size))
    return solvers


# ---------------------------------------------------------------------- eigh
def eigh_driver(device: torch.device | str) -> EighDriver:
    """The driver of ``device``; ``eigh_driver(d).check()`` waits and reports pending failures."""
    return device_driver(device, "cupy", cuda_solvers)


def eigh(corr: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors (columns) of the lower triangle of ``corr`` (..., n, n).

    Enqueued on torch's current stream; nothing waits for the GPU. A matrix cuSOLVER
    failed on gets NaN eigenvalues (set on the device), and a later call warns about it.
    """
    if corr.device.type != "cuda":
        raise RuntimeError(f"backend 'cupy' runs on CUDA tensors, got a tensor on {corr.device}")
    return eigh_driver(corr.device).eigh(corr)
