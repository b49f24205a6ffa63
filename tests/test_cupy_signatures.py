"""backend="cupy" calls CuPy's low-level cuSOLVER bindings with the arguments the
cuSOLVER API documents, checked without a GPU (CuPy imports without one).

The expected parameter lists are cuSOLVER's documented prototypes (cusolverDn.h,
CUDA 13), written out here independently of fastpred/backends/cupy.py; CuPy returns
the ``bufferSize`` outputs instead of taking pointers to them. The binding's own
signature (the first line of its docstring, which Cython generates from the
declaration) must list the same parameters in the same order. Then the backend's
solver functions run on CPU tensors with the bindings replaced by recorders: every
call must bind to that signature, with the data-type codes of library_types.h and the
workspace sizes in the unit each routine expects (bytes for Xsyevd, elements for
syevjBatched).
"""
import contextlib
import re
import types

import pytest
import torch

cusolver = pytest.importorskip("cupy_backends.cuda.libs.cusolver", reason="CuPy not installed (cupy-cuda13x)")
cublas = pytest.importorskip("cupy_backends.cuda.libs.cublas")
from fastpred.backends import cupy as backend  # noqa: E402

# cusolverDn.h prototypes, less the trailing output pointers CuPy returns instead.
DOCUMENTED = {
    "xsyevd_bufferSize": "handle params jobz uplo n dataTypeA A lda dataTypeW W computeType",
    "xsyevd": "handle params jobz uplo n dataTypeA A lda dataTypeW W computeType bufferOnDevice "
              "workspaceInBytesOnDevice bufferOnHost workspaceInBytesOnHost info",
    "ssyevjBatched_bufferSize": "handle jobz uplo n A lda W params batchSize",
    "ssyevjBatched": "handle jobz uplo n A lda W work lwork info params batchSize",
    "dsyevjBatched_bufferSize": "handle jobz uplo n A lda W params batchSize",
    "dsyevjBatched": "handle jobz uplo n A lda W work lwork info params batchSize",
}
CUDA_R_32F, CUDA_R_64F = 0, 1  # library_types.h
CUSOLVER_EIG_MODE_VECTOR = 1  # cusolver_common.h
CUBLAS_FILL_MODE_UPPER = 1  # cublas_api.h


def binding_parameters(name: str) -> list[str]:
    """Parameter names from the binding's docstring signature, e.g. ``f(intptr_t handle, int n)``."""
    first = getattr(cusolver, name).__doc__.splitlines()[0]
    inside = re.match(rf"{name}\((.*?)\)", first).group(1)
    return [p.split()[-1] for p in inside.split(",")]


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_binding_matches_the_documented_prototype(name):
    assert binding_parameters(name) == DOCUMENTED[name].split()


def test_constants_are_the_headers_values():
    assert cusolver.CUSOLVER_EIG_MODE_VECTOR == CUSOLVER_EIG_MODE_VECTOR
    assert cublas.CUBLAS_FILL_MODE_UPPER == CUBLAS_FILL_MODE_UPPER
    assert backend._CUDA_TYPE == {torch.float32: CUDA_R_32F, torch.float64: CUDA_R_64F}


@pytest.fixture
def recorded(monkeypatch):
    """The backend's bindings replaced by recorders that bind arguments by name."""
    calls = []

    def recorder(name, result):
        params = binding_parameters(name)

        def call(*args):
            assert len(args) == len(params), f"{name}: {len(args)} arguments, the binding takes {len(params)}"
            calls.append((name, dict(zip(params, args))))
            return result

        return call

    fake = types.SimpleNamespace(**{name: recorder(name, (4096, 16) if name == "xsyevd_bufferSize" else 100)
                                    for name in DOCUMENTED})
    monkeypatch.setattr(backend, "_cusolver", fake)
    ctx = types.SimpleNamespace(index=0, handle=11, params=22, syevj=33, stream=contextlib.nullcontext)
    monkeypatch.setattr(backend, "_context", lambda tensor: ctx)
    monkeypatch.setattr(backend.cupy.cuda, "Device", lambda index: contextlib.nullcontext())
    return calls


@pytest.mark.parametrize("dtype, code", [(torch.float32, CUDA_R_32F), (torch.float64, CUDA_R_64F)])
def test_xsyevd_calls(recorded, dtype, code):
    batch, n = 3, 5
    a, w = torch.zeros(batch, n, n, dtype=dtype), torch.zeros(batch, n, dtype=dtype)
    info = torch.zeros(batch, dtype=torch.int32)
    assert backend._xsyevd_size(a[:1], w[:1]) == (4096, 16)
    work_device, work_host = torch.zeros(4096, dtype=torch.uint8), torch.zeros(16, dtype=torch.uint8)
    backend._xsyevd_run(a, w, info, work_device, work_host)
    (size_name, size), *runs = recorded
    assert size_name == "xsyevd_bufferSize" and len(runs) == batch
    for args in [size] + [r for _, r in runs]:
        assert (args["handle"], args["params"]) == (11, 22)
        assert args["jobz"] == CUSOLVER_EIG_MODE_VECTOR and args["uplo"] == CUBLAS_FILL_MODE_UPPER
        assert args["n"] == args["lda"] == n
        assert args["dataTypeA"] == args["dataTypeW"] == args["computeType"] == code
    for b, (name, args) in enumerate(runs):
        assert name == "xsyevd"
        assert args["A"] == a[b].data_ptr() and args["W"] == w[b].data_ptr() and args["info"] == info[b].data_ptr()
        assert args["bufferOnDevice"] == work_device.data_ptr() and args["workspaceInBytesOnDevice"] == 4096
        assert args["bufferOnHost"] == work_host.data_ptr() and args["workspaceInBytesOnHost"] == 16


@pytest.mark.parametrize("dtype, prefix", [(torch.float32, "s"), (torch.float64, "d")])
def test_syevj_batched_calls(recorded, dtype, prefix):
    batch, n = 4, 6
    a, w = torch.zeros(batch, n, n, dtype=dtype), torch.zeros(batch, n, dtype=dtype)
    info = torch.zeros(batch, dtype=torch.int32)
    device_bytes, host_bytes = backend._syevj_batched_size(a, w)
    assert (device_bytes, host_bytes) == (100 * a.element_size(), 0)  # lwork is in elements
    work_device = torch.zeros(device_bytes, dtype=torch.uint8)
    backend._syevj_batched_run(a, w, info, work_device, torch.zeros(0, dtype=torch.uint8))
    (size_name, size), (run_name, run) = recorded
    assert (size_name, run_name) == (f"{prefix}syevjBatched_bufferSize", f"{prefix}syevjBatched")
    for args in (size, run):
        assert args["jobz"] == CUSOLVER_EIG_MODE_VECTOR and args["uplo"] == CUBLAS_FILL_MODE_UPPER
        assert args["n"] == args["lda"] == n and args["batchSize"] == batch
        assert args["params"] == 33 and args["A"] == a.data_ptr() and args["W"] == w.data_ptr()
    assert run["work"] == work_device.data_ptr() and run["lwork"] == 100 and run["info"] == info.data_ptr()
