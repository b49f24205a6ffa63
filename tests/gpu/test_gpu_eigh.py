"""The GPU eigensolver: csrc's cuSOLVER binding and the CuPy backend against
torch.linalg.eigh, through fastpred.backends.eigh_driver (needs a GPU; skipped here).

Covers Xsyevd for single matrices, XsyevBatched for stacks (and its chunking), CuPy's
syevjBatched and Xsyevd, float64, and the lazy info path with a failure injected
into a real cuSOLVER call's info.
"""
import pytest
import torch

pytestmark = pytest.mark.gpu


def correlation(d, batch=(), seed=1, dtype=torch.float32):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(*batch, 2 * d + 3, d, device="cuda", generator=g, dtype=torch.float64)
    x = x @ (torch.randn(d, d, device="cuda", generator=g, dtype=torch.float64) / d**0.5 + torch.eye(d, device="cuda"))
    return (x.mT @ x / x.shape[-2]).to(dtype)


def check_eigh(a, w, u):
    ref_w = torch.linalg.eigh(a.double())[0]
    scale = ref_w.abs().amax().item()
    tol = 1e-4 if a.dtype == torch.float32 else 1e-10
    assert (w.double() - ref_w).abs().max().item() < tol * scale
    resid = a.double() @ u.double() - u.double() * w.double().unsqueeze(-2)
    assert resid.abs().max().item() < 10 * tol * scale
    eye = torch.eye(a.shape[-1], device="cuda", dtype=torch.float64)
    assert (u.double().mT @ u.double() - eye).abs().max().item() < 10 * tol


@pytest.fixture(params=["csrc", "cupy"])
def backend(request):
    if request.param == "cupy":
        pytest.importorskip("cupy", reason="CuPy not installed: pip install 'fastpred[cuda]'")
        from fastpred.backends import cupy as module
    else:
        from fastpred.backends import csrc as module

        if not module.built_with_cuda():
            pytest.fail("fastpred._C was built without CUDA")
    return module


@pytest.mark.parametrize("d", [1, 7, 32, 33, 128, 257, 1024])
@pytest.mark.parametrize("batch", [(), (5,), (2, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eigh_matches_torch(backend, d, batch, dtype):
    if batch and d >= 1024:
        pytest.skip("large stacks: benchmarked by make gpu-check")
    a = correlation(d, batch, dtype=dtype)
    w, u = backend.eigh(a)
    assert w.shape == a.shape[:-1] and u.shape == a.shape and w.dtype == dtype
    check_eigh(a, w, u)
    backend.eigh_driver(a.device).check()  # nothing failed


def test_solver_routing(backend):
    from fastpred import _C

    driver = backend.eigh_driver("cuda")
    before = dict(driver.stats.solver_calls)
    backend.eigh(correlation(64))
    backend.eigh(correlation(64, (8,)))
    backend.eigh(correlation(16, (8,)))
    used = {k: v - before.get(k, 0) for k, v in driver.stats.solver_calls.items() if v != before.get(k, 0)}
    single = "csrc.Xsyevd" if backend.__name__.endswith("csrc") else "cupy.Xsyevd"
    assert used.get(single, 0) >= 1
    if _C.has_syevd_batched():
        assert used.get("csrc.XsyevBatched", 0) == 2, used


def test_batched_chunks_under_int32_limit_on_device():
    from fastpred.backends import csrc
    from fastpred.backends.eigh_driver import EighDriver, TorchCudaOps

    if not csrc._C.has_syevd_batched():
        pytest.skip("cuSOLVER < 11.7.1: no XsyevBatched")
    n = 40
    driver = EighDriver(TorchCudaOps("cuda"), csrc.cuda_solvers(), int32_limit=3 * n * n)
    a = correlation(n, (7,))
    w, u = driver.eigh(a)
    check_eigh(a, w, u)
    # 7 = 3 + 3 batched, and the last lone matrix to Xsyevd (tests/test_eigh_driver.py replays it)
    assert driver.stats.solver_calls == {"csrc.XsyevBatched": 2, "csrc.Xsyevd": 1}


def test_failure_gives_nan_at_once_is_warned_later_and_sizes_move_to_float64():
    import warnings

    from fastpred.backends import csrc
    from fastpred.backends import triton as triton_backend
    from fastpred.eig_map import EigMap
    from fastpred.backends.eigh_driver import EighDriver, Solver, TorchCudaOps

    real = [s for s in csrc.cuda_solvers() if not s.batched][0]

    def failing(a, w, info, work_device, work_host):
        real.run(a, w, info, work_device, work_host)
        if a.dtype == torch.float32:
            info.fill_(3)  # on the device, as a non-converged cuSOLVER call would leave it

    driver = EighDriver(TorchCudaOps("cuda"), [Solver("failing", failing, real.workspace_size)])
    w, u = driver.eigh(correlation(20))
    assert torch.isnan(w).all().item()  # set on the device, no host sync in the call
    for rebuild in (csrc.rebuild, triton_backend.rebuild):  # W built from it is rejected
        assert not torch.isfinite(rebuild(w, u, EigMap())).all().item()
    torch.cuda.synchronize()  # let the info copy land
    with pytest.warns(RuntimeWarning, match="info=3"):
        w, u = driver.eigh(correlation(20))  # this call is fine: the earlier one is reported
    assert w.dtype == torch.float32
    check_eigh(correlation(20), w, u)
    w, u = driver.eigh(correlation(20))  # now float64 inside, float32 out
    check_eigh(correlation(20), w, u)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert driver.check() == []


def test_cupy_single_matrix_workspace_is_cached():
    pytest.importorskip("cupy", reason="CuPy not installed: pip install 'fastpred[cuda]'")
    from fastpred.backends import cupy as backend

    driver = backend.eigh_driver("cuda")
    backend.eigh(correlation(96))
    allocations = driver.stats.workspace_allocations
    for _ in range(5):
        backend.eigh(correlation(96))
    assert driver.stats.workspace_allocations == allocations


def test_cupy_dlpack_helpers_are_zero_copy():
    pytest.importorskip("cupy", reason="CuPy not installed: pip install 'fastpred[cuda]'")
    from fastpred.backends import cupy as backend

    t = torch.arange(6.0, device="cuda")
    view = backend.as_cupy(t)
    view[0] = 42.0
    torch.cuda.synchronize()
    assert t[0].item() == 42.0 and backend.as_torch(view).data_ptr() == t.data_ptr()
