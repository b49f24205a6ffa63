"""The feature-dependent (partitioned) predictor against a per-sample NumPy loop, and
async_rebuild against the synchronous path."""
import copy

import numpy as np
import pytest
import torch

from fastpred import DirectPredictor
from fastpred.schedule import start_rebuild
from reference_numpy import directpred_weight


def batches(n_steps, n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    return [torch.randn(n, d, generator=g) @ mix + 0.1 for _ in range(n_steps)]


def partition_loop(planes, w0, xs, k, rho, freq):
    """Plain loops: per-sample predictor matrices, per-partition outer-product averages."""
    W = [np.array(w, dtype=np.float64) for w in w0]
    F = [None] * (2 * k)
    outputs = []
    for t, x in enumerate(xs):
        x = x.astype(np.float64)
        if t >= 1 and (t - 1) % freq == 0:
            W = [directpred_weight(f, 0.1, 0.5, "relative", 1e-4) if f is not None else w for f, w in zip(F, W)]
        proj = x @ planes
        above = proj >= proj.mean(axis=0)
        y = np.zeros_like(x)
        for n in range(len(x)):
            w_n = sum(W[2 * i] if above[n, i] else W[2 * i + 1] for i in range(k)) / k
            y[n] = w_n @ x[n]
        outputs.append(y)
        for i in range(k):
            for j, members in ((2 * i, above[:, i]), (2 * i + 1, ~above[:, i])):
                if members.any():
                    batch = np.mean([np.outer(v, v) for v in x[members]], axis=0)
                    F[j] = batch if F[j] is None else rho * F[j] + (1 - rho) * batch
    return W, F, outputs


@pytest.mark.parametrize("k, freq", [(1, 1), (3, 2)])
def test_partitions_match_per_sample_loop(k, freq):
    d, n = 6, 40
    torch.manual_seed(1)
    pred = DirectPredictor(d, partitions=k, freq=freq, backend="torch")
    assert pred.weight.shape == (2 * k, d, d)
    xs = batches(5, n, d)
    W, F, outs = partition_loop(pred.planes.double().numpy(), pred.weight.detach().numpy(), [x.numpy() for x in xs], k, 0.3, freq)
    ys = [pred(x).detach().numpy() for x in xs]
    for t, (y, y_ref) in enumerate(zip(ys, outs)):
        np.testing.assert_allclose(y, y_ref, atol=2e-4 * np.abs(y_ref).max(), err_msg=f"step {t}")
    for j in range(2 * k):
        np.testing.assert_allclose(pred.corr[j].numpy(), F[j], rtol=1e-5, atol=1e-5 * np.abs(F[j]).max())


def test_partition_eval_uses_running_thresholds_and_changes_nothing():
    pred = DirectPredictor(5, partitions=2)
    for x in batches(3, 30, 5):
        pred(x)
    state = copy.deepcopy(pred.state_dict())
    pred.eval()
    single = batches(1, 1, 5, seed=7)[0]
    y = pred(single)
    # One sample: its halves are decided by the running thresholds, not by itself.
    above = (single @ pred.planes >= pred.thresholds).float()[0]
    w = sum(pred.weight[2 * i] if above[i] else pred.weight[2 * i + 1] for i in range(2)) / 2
    torch.testing.assert_close(y, single @ w.detach().T)
    for key, v in pred.state_dict().items():
        assert torch.equal(v, state[key]), key


@pytest.mark.parametrize("kwargs", [dict(freq=1), dict(freq=2), dict(partitions=2, zero_mean=True)])
def test_async_rebuild_is_bit_identical_to_synchronous(kwargs):
    d = 16
    xs = batches(7, 64, d)
    torch.manual_seed(3)
    sync = DirectPredictor(d, **kwargs)
    torch.manual_seed(3)
    overlap = DirectPredictor(d, async_rebuild=True, **kwargs)
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (sync, overlap)]
    overlap_outputs, twin = [], None
    for step, x in enumerate(xs):
        outs = []
        for m, opt in zip((sync, overlap), opts):
            opt.zero_grad()
            y = m(x)
            if m.weight.requires_grad:
                y.pow(2).mean().backward()
                opt.step()
            outs.append(y.detach())
        assert torch.equal(outs[0], outs[1]), step
        overlap_outputs.append(outs[1])
        if twin is None and overlap._schedule.pending is not None:
            # A copy taken with a rebuild in flight drops it and recomputes it.
            twin, twin_step = copy.deepcopy(overlap), step + 1
            assert twin._schedule.pending is None
    for key, v in sync.state_dict().items():
        assert torch.equal(v, overlap.state_dict()[key]), key
    assert torch.equal(twin(xs[twin_step]).detach(), overlap_outputs[twin_step])


def test_async_rebuild_failure_keeps_weight(monkeypatch):
    pred = DirectPredictor(4, async_rebuild=True, backend="torch")
    xs = batches(3, 10, 4)
    pred(xs[0])  # schedules the rebuild for step 1
    pred(xs[1])
    kept = pred.weight.detach().clone()

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("injected failure")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    pred._schedule.pending = start_rebuild(pred._weight_from, pred.corr.clone())  # computed with the broken solver
    with pytest.warns(RuntimeWarning, match="keeping the previous W_p"):
        pred(xs[2])
    torch.testing.assert_close(pred.weight.detach(), kept)
    assert int(pred.num_eigh_failures) == 1


def test_partitions_make_no_host_to_device_copy_per_step(monkeypatch):
    """A tensor built from a Python list is a blocking host-to-device copy on CUDA (and
    breaks CUDA-graph capture): the sample count must be made on the device."""
    made = []
    original = torch.Tensor.new_tensor
    monkeypatch.setattr(torch.Tensor, "new_tensor", lambda self, *a, **k: made.append(a) or original(self, *a, **k))
    pred = DirectPredictor(5, partitions=2, backend="torch")
    for x in batches(3, 20, 5):
        pred(x)
    assert made == []


class _FakeStream:
    def __init__(self):
        self.waited_for = []

    def wait_stream(self, other):
        self.waited_for.append(other)

    def wait_event(self, event):
        self.waited_for.append(event)


class _FakeEvent:
    def record(self, stream=None):
        self.stream = stream


def test_side_stream_rebuild_tells_the_allocator_who_reads_what(monkeypatch):
    """F's copy is made on the main stream and read only by side-stream kernels: it must
    be recorded on the side stream, and W_p (made on the side stream) on the main one."""
    import contextlib

    from fastpred import schedule

    main, side = _FakeStream(), _FakeStream()
    recorded = []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: recorded.append((self, s)))
    corr = torch.eye(3) * 2
    pending = schedule.start_on_stream(lambda c: c.sqrt(), corr, side)
    assert side.waited_for == [main]  # F is complete before the side stream reads it
    assert any(t is corr and s is side for t, s in recorded)
    assert any(t is pending.weight and s is main for t, s in recorded)
    torch.testing.assert_close(pending.collect(), corr.sqrt())
    assert main.waited_for == [pending.done]  # the main stream waits on the device, not the host


@pytest.mark.parametrize("kwargs", [dict(freq=1), dict(freq=2, partitions=2)])
def test_attached_async_rebuild_is_bit_identical_to_attached_synchronous(kwargs):
    """With attach the rebuild starts in step() (after the optimizer step) and is swapped
    in at the next call."""
    d = 8
    torch.manual_seed(4)
    sync = DirectPredictor(d, **kwargs)
    torch.manual_seed(4)
    overlap = DirectPredictor(d, async_rebuild=True, **kwargs)
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (sync, overlap)]
    for m, opt in zip((sync, overlap), opts):
        m.attach(opt)
    for x in batches(5, 32, d):
        outs = []
        for m, opt in zip((sync, overlap), opts):
            z1, z2 = x.chunk(2)
            y = torch.cat([m(z1.requires_grad_()), m(z2.requires_grad_())])
            y.pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            outs.append(y.detach())
        assert torch.equal(outs[0], outs[1])
    overlap(torch.zeros(0, d))  # swaps in the last rebuild
    assert torch.equal(sync.weight, overlap.weight)
    assert torch.equal(sync.corr, overlap.corr)
