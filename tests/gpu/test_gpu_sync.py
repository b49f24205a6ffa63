"""No host synchronisation in the DirectPred hot path, and one predictor step in a CUDA graph.

Two independent checks per backend, after warm-up steps:
* ``torch.cuda.set_sync_debug_mode("error")``: any synchronizing call torch knows of
  (item, blocking copies, stream/device synchronize) raises;
* the host is not blocked at all: a step is enqueued behind a long GPU sleep and must
  return long before the sleep ends (this also catches syncs inside cuSOLVER that
  torch cannot see).
Then one training step is captured in a CUDA graph and its replay compared with an
eager step. These are CUDA-only (marked ``gpu``); the solver tests at the end run on every
device.
"""
import copy
import time

import pytest
import torch

from tests.devices import DEVICES, generator, no_host_sync

DIM, N = 256, 512
SLEEP_CYCLES = 200_000_000  # ~0.1 s of GPU time on a ~2 GHz clock


def sync_free_backends():
    """Backends whose eigh is fastpred's GPU eigensolver (torch.linalg.eigh syncs by design)."""
    names = ["csrc"]
    try:
        import cupy  # noqa: F401

        names.append("cupy")
    except ImportError:
        pass
    return names + ["auto"]


def eigh_driver_of(backend):
    """The eigh driver behind ``backend`` on this GPU, or None if its eigh is torch's."""
    from fastpred import backends as registry
    from fastpred.backends import reference

    eigh = registry.resolve(backend, torch.device("cuda")).eigh
    if eigh is reference.eigh:
        return None
    import importlib

    driver = getattr(importlib.import_module(eigh.__module__), "eigh_driver", None)
    if driver is None:
        pytest.skip(f"backend={backend!r} uses {eigh.__module__}.eigh, not fastpred's eigh driver")
    return driver(torch.device("cuda", torch.cuda.current_device()))


def require_gpu_eigensolver(backend):
    if eigh_driver_of(backend) is None:
        pytest.skip(f"backend={backend!r} resolves eigh to torch.linalg.eigh here (install CuPy: "
                    "pip install 'fastpred[cuda]')")


def predictor(backend, **kw):
    from fastpred import DirectPredictor

    return DirectPredictor(DIM, backend=backend, **kw).cuda()


def steps(pred, x, k):
    for _ in range(k):
        pred(x)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", sync_free_backends())
def test_predictor_step_makes_no_host_sync(backend):
    require_gpu_eigensolver(backend)
    pred, x = predictor(backend), torch.randn(N, DIM, device="cuda")
    steps(pred, x, 3)  # first update, first rebuild, workspaces cached
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps(pred, x, 5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(pred.weight).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", sync_free_backends())
def test_predictor_step_does_not_block_the_host(backend):
    require_gpu_eigensolver(backend)
    pred, x = predictor(backend), torch.randn(N, DIM, device="cuda")
    steps(pred, x, 3)
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(SLEEP_CYCLES)
    end.record()
    t0 = time.perf_counter()
    steps(pred, x, 2)
    host_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    sleep_s = start.elapsed_time(end) / 1e3
    assert host_s < 0.5 * sleep_s, f"the host waited {host_s * 1e3:.1f} ms behind a {sleep_s * 1e3:.1f} ms GPU sleep"


@pytest.mark.gpu
def test_torch_backend_does_sync_which_is_why_it_is_not_the_gpu_default():
    # The contrast the two tests above rely on: torch.linalg.eigh checks info on the host.
    pred, x = predictor("torch"), torch.randn(N, DIM, device="cuda")
    steps(pred, x, 3)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            steps(pred, x, 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", sync_free_backends())
def test_one_predictor_step_is_captured_in_a_cuda_graph(backend):
    require_gpu_eigensolver(backend)
    pred, x = predictor(backend), torch.randn(N, DIM, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        steps(pred, x, 3)  # warm-up off the default stream, as CUDA graphs need
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    eager = copy.deepcopy(pred)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = pred(x)  # rebuild (due every step) + prediction + statistics
    graph.replay()
    y_eager = eager(x)
    torch.cuda.synchronize()
    torch.testing.assert_close(y, y_eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pred.corr, eager.corr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred.weight, eager.weight, rtol=1e-4, atol=1e-5)
    eigh_driver_of(backend).check()  # the captured solve's info, read after the replay


def _correlation(device, seed=0):
    g = generator(device, seed)
    x = torch.randn(N, DIM, device=device, generator=g) + 0.2
    return x.T @ x / N


# The two solver tests below are device-generic (tests/devices.py): the same body on CPU
# always, so that API drift fails there; the host-sync check acts on CUDA only.
@pytest.mark.parametrize("device", DEVICES)
def test_directcopy_closed_form_makes_no_host_sync_and_matches_float64_eigh(device):
    """power 1: W = F / s_max + eps I from the warm-started Krylov solve, no eigh of F."""
    from fastpred import functional as F
    from fastpred import solvers

    if device == "cuda":
        require_gpu_eigensolver("auto")
    corr = _correlation(device)
    top = solvers.init_state("closed_form", corr)
    F.directpred_weight(corr, power=1.0, solver_state=top)
    with no_host_sync(device):
        for k in range(3):
            corr = 0.99 * corr + 0.01 * _correlation(device, k + 1)
            w = F.directpred_weight(corr, power=1.0, solver_state=top)
    s, u = torch.linalg.eigh(corr.double())
    exact = (u * (s / s[-1] + 0.1)) @ u.mT
    assert (w.double() - exact).abs().max().item() < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_warm_solver_makes_no_host_sync_at_steady_state(device):
    """On CUDA the refresh decision of the warm solver travels through pinned memory, one call late."""
    from fastpred import experimental, solvers
    from fastpred import functional as F
    from fastpred.eig_map import EigMap

    if device == "cuda":
        require_gpu_eigensolver("auto")
    corr = _correlation(device)
    state = solvers.init_state("warm", corr)
    F.directpred_weight(corr, solver="warm", solver_state=state)  # full eigh (no basis yet)
    corr = 0.999 * corr + 0.001 * _correlation(device, 1)
    F.directpred_weight(corr, solver="warm", solver_state=state)  # refines, leaves its flag in flight
    with no_host_sync(device):
        for k in range(3):
            corr = 0.999 * corr + 0.001 * _correlation(device, k + 2)
            w, refreshed = experimental.warm_eigh_weight(corr, state, EigMap())
            assert not refreshed
    assert torch.isfinite(w).all()
