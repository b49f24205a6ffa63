"""DirectPredictor on each device: async rebuild (a side stream on CUDA, a worker thread on
CPU), copies, attach with per-view calls and the keep-previous-W_p decision, each without a
host sync on CUDA. The bodies run on CPU too (tests/devices.py), so API drift fails there."""
import copy
import pickle

import pytest
import torch

from fastpred import DirectPredictor, functional
from tests.devices import DEVICES, generator, no_host_sync

D, N = 64, 256


def batches(device, k, seed=0):
    g = generator(device, seed)
    return [torch.randn(N, D, device=device, generator=g) + 0.1 for _ in range(k)]


def require_sync_free_eigh(device):
    from fastpred import backends
    from fastpred.backends import reference

    if device == "cuda" and backends.resolve("auto", torch.device("cuda")).eigh is reference.eigh:
        pytest.skip("auto resolves eigh to torch.linalg.eigh here, which syncs (install CuPy)")


@pytest.mark.parametrize("device", DEVICES)
def test_async_rebuild_matches_synchronous_and_copies(device):
    torch.manual_seed(0)
    sync = DirectPredictor(D).to(device)
    torch.manual_seed(0)
    overlap = DirectPredictor(D, async_rebuild=True).to(device)
    for x in batches(device, 6):
        torch.testing.assert_close(overlap(x), sync(x), rtol=1e-4, atol=1e-5)
        # The copy of F read off the critical path must survive the caller's later allocations.
        torch.empty(1024 * 1024, device=device).fill_(float("nan"))
    assert overlap._schedule.pending is not None  # the last step's rebuild is in flight
    twin = copy.deepcopy(overlap)  # a rebuild in flight (an event, a future) must not travel
    pickle.loads(pickle.dumps(overlap))
    x = batches(device, 1, seed=1)[0]
    torch.testing.assert_close(twin(x), overlap(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_attached_per_view_steps_make_no_host_sync(device):
    require_sync_free_eigh(device)
    pred = DirectPredictor(D).to(device)
    opt = torch.optim.SGD([torch.zeros(1, device=device, requires_grad=True)], lr=0.1)
    pred.attach(opt)
    xs = batches(device, 6)
    for x in xs[:3]:  # first fold, first rebuild, workspaces cached
        pred(x[: N // 2]), pred(x[N // 2:])
        opt.step()
    with no_host_sync(device):
        for x in xs[3:]:
            pred(x[: N // 2]), pred(x[N // 2:])
            opt.step()
    assert int(pred.num_updates) == 6 and torch.isfinite(pred.weight).all()


@pytest.mark.parametrize("device", DEVICES)
def test_a_nan_rebuild_keeps_the_previous_weight_without_a_host_sync(device, monkeypatch):
    pred = DirectPredictor(D).to(device)
    xs = batches(device, 3)
    pred(xs[0]), pred(xs[1])
    kept = pred.weight.detach().clone()
    # The module computes W_p through functional.solve_weight; a NaN result is what a GPU
    # eigensolver's lazy failure looks like.
    monkeypatch.setattr(functional, "solve_weight", lambda corr, *a, **kw: torch.full_like(corr, float("nan")))
    with no_host_sync(device), pytest.warns(RuntimeWarning) if device == "cpu" else _nothing():
        pred(xs[2])
    assert torch.equal(pred.weight.detach(), kept)
    assert int(pred.num_eigh_failures) == 1


def _nothing():
    import contextlib

    return contextlib.nullcontext()
