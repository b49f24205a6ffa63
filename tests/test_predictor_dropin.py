"""DirectPredictor as a drop-in: per-view calls, attach()/step() (one fold per optimizer
step), gradient accumulation, torch.compile in training, dtype casts, bad input, and
all-or-nothing loading. Numbers are held to the NumPy model (tests/reference_numpy.py)
or to the same predictor fed the concatenation / union, which the authors' semantics
say must be equal."""
import copy
import pickle
import warnings

import numpy as np
import pytest
import torch

import fastpred.backends
from fastpred import DirectPredictor, functional
from fastpred.schedule import start_rebuild
from reference_numpy import DirectPredNumpy


def features(n, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    return (torch.randn(n, d, generator=g) @ mix + 0.2).to(dtype)


def twins(d, **kwargs):
    torch.manual_seed(0)
    a = DirectPredictor(d, backend="torch", **kwargs)
    b = DirectPredictor(d, backend="torch", **kwargs)
    b.load_state_dict(a.state_dict())
    return a, b


def byol_loss(p, target):
    return (2 - 2 * torch.nn.functional.cosine_similarity(p, target, dim=-1)).sum()


# ------------------------------------------------------------------ per-view calls
@pytest.mark.parametrize("freq", [1, 2])
def test_per_view_calls_with_attach_equal_one_call_on_the_concatenation(freq):
    d, n, steps = 8, 24, 7
    per_view, concat = twins(d, freq=freq)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (per_view, concat)]
    handles = [m.attach(o) for m, o in zip((per_view, concat), opts)]
    model = DirectPredNumpy(per_view.weight.detach().numpy(), freq=freq)
    for t in range(steps):
        z1, z2 = features(n, d, 2 * t).requires_grad_(), features(n, d, 2 * t + 1).requires_grad_()
        t1, t2 = z2.detach().flip(0), z1.detach().flip(0)  # stand-ins for the target projections
        for o in opts:
            o.zero_grad()
        p1, p2 = per_view(z1), per_view(z2)
        (byol_loss(p1, t2) + byol_loss(p2, t1)).backward()
        q1, q2 = concat(torch.cat([z1, z2])).chunk(2)
        (byol_loss(q1, t2) + byol_loss(q2, t1)).backward()
        torch.testing.assert_close(torch.cat([p1, p2]), torch.cat([q1, q2]), rtol=1e-5, atol=1e-5)
        if freq == 1:  # W_p is then set, never trained: the NumPy model applies
            y_ref = np.concatenate(model.step_calls([z1.detach().numpy(), z2.detach().numpy()]))
            np.testing.assert_allclose(p1.detach().numpy(), y_ref[:n], atol=2e-4 * np.abs(y_ref).max())
        for o in opts:
            o.step()
        torch.testing.assert_close(per_view.corr, concat.corr, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(per_view.weight, concat.weight, rtol=1e-4, atol=1e-5)
        if freq == 1:
            np.testing.assert_allclose(per_view.corr.numpy(), model.F, rtol=1e-5, atol=1e-5 * np.abs(model.F).max())
    assert int(per_view.num_updates) == int(concat.num_updates) == steps
    for h in handles:
        h.remove()


@pytest.mark.parametrize("freq", [1, 2])
def test_accumulated_micro_batches_equal_one_step_on_their_union(freq):
    d, n, k, steps = 6, 16, 2, 7
    accum, union = twins(d, freq=freq, zero_mean=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (accum, union)]
    for m, o in zip((accum, union), opts):
        m.attach(o)
    for t in range(steps):
        xs = [features(n, d, 10 * t + i).requires_grad_() for i in range(k)]
        targets = [x.detach().roll(1, 0) for x in xs]
        for o in opts:
            o.zero_grad()
        for x, target in zip(xs, targets):  # k backward passes, one optimizer step
            byol_loss(accum(x), target).backward()
        byol_loss(union(torch.cat([x.detach() for x in xs]).requires_grad_()), torch.cat(targets)).backward()
        for o in opts:
            o.step()
    assert int(accum.num_updates) == steps  # optimizer steps, not micro-batches
    for name in ("corr", "mean", "weight", "folded"):
        torch.testing.assert_close(getattr(accum, name), getattr(union, name), rtol=1e-4, atol=1e-5, msg=name)


def test_manual_step_without_an_optimizer_and_remove():
    d = 5
    pred, ref = twins(d)
    handle = pred.attach()  # manual loop: the caller steps
    x1, x2 = features(10, d, 1), features(10, d, 2)
    pred(x1), pred(x2)
    assert int(pred.num_updates) == 0
    pred.step()
    ref(torch.cat([x1, x2]))
    torch.testing.assert_close(pred.corr, ref.corr)
    handle.remove()
    pred(x1)  # one call, one step again
    ref(x1)
    torch.testing.assert_close(pred.corr, ref.corr)
    assert int(pred.num_updates) == int(ref.num_updates) == 2
    with pytest.raises(RuntimeError, match="attach"):
        pred.step()


@pytest.mark.parametrize(
    "kwargs",
    [dict(freq=1), dict(freq=2), dict(freq=2, partitions=2), dict(async_rebuild=True), dict(zero_mean=True, freq=3)],
    ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()),
)
def test_per_view_calls_without_attach_backpropagate_through_the_weight_each_call_used(kwargs):
    """Each call is a step and the second one rebuilds W_p in place: the first call's
    backward must still use the W_p it was computed with (it failed with an in-place
    autograd error)."""
    d, n = 6, 12
    pred = DirectPredictor(d, backend="torch", **kwargs)
    opt = torch.optim.SGD(pred.parameters(), lr=0.05)
    rebuilt = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(4):
            x1 = features(n, d, 2 * t).requires_grad_()
            x2 = features(n, d, 2 * t + 1).requires_grad_()
            r1, r2 = torch.randn(n, d), torch.randn(n, d)
            opt.zero_grad()
            y1 = pred(x1)
            w1 = pred.weight.detach().clone()
            y2 = pred(x2)
            rebuilt += not torch.equal(pred.weight.detach(), w1)
            ((y1 * r1).sum() + (y2 * r2).sum()).backward()
            if not pred.partitions:
                used = torch.linalg.lstsq(x1.detach().double(), y1.detach().double()).solution.T  # the W call 1 used
                torch.testing.assert_close(x1.grad.double(), r1.double() @ used, rtol=1e-5, atol=1e-5)
            opt.step()
    assert rebuilt > 0  # the situation under test did occur
    # the misuse (several calls per optimizer step, not attached) is named once
    assert [w.category for w in caught if "training calls between two optimizer steps" in str(w.message)] == [
        RuntimeWarning], [str(w.message) for w in caught]


# ------------------------------------------------------------------ torch.compile
class _Byol(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.projector = torch.nn.Linear(12, 8)
        self.predictor = DirectPredictor(8, backend="torch", **kwargs)

    def forward(self, a, b):
        z1, z2 = self.projector(a), self.projector(b)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return byol_loss(p1, z2.detach()) + byol_loss(p2, z1.detach())


@pytest.mark.parametrize("attach", [True, False], ids=["attach", "per-call"])
@pytest.mark.parametrize("freq", [1, 2])
def test_compiled_training_compiles_a_bounded_number_of_graphs_and_matches_eager(attach, freq, monkeypatch):
    # As in a fresh process: no backend resolved yet. A first resolution inside the trace
    # (an import) would split the attached forward into 6 graphs for good.
    monkeypatch.setattr(fastpred.backends, "_resolved", {})
    torch.manual_seed(0)
    model, eager = _Byol(freq=freq), _Byol(freq=freq)
    eager.load_state_dict(model.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, eager)]
    if attach:
        for m, o in zip((model, eager), opts):
            m.predictor.attach(o)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting_backend)
    g = torch.Generator().manual_seed(1)
    after_8 = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(24):
            a, b = torch.randn(16, 12, generator=g), torch.randn(16, 12, generator=g)
            losses = []
            for m, o in ((compiled, opts[0]), (eager, opts[1])):
                o.zero_grad()
                loss = m(a, b)
                loss.backward()
                o.step()
                losses.append(loss.detach())
            torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
            if step == 7:
                after_8 = len(graphs)
    assert not [w for w in caught if "recompile" in str(w.message).lower()]
    # Attached: the whole training forward is one graph (the fold runs after opt.step()).
    # Per call: each predictor call breaks the graph where the step runs eagerly.
    assert len(graphs) == after_8 == (1 if attach else 3)  # and no growth with the steps
    torch.testing.assert_close(model.predictor.corr, eager.predictor.corr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.predictor.weight, eager.predictor.weight, rtol=1e-4, atol=1e-5)
    assert int(model.predictor.num_updates) == (24 if attach else 48)


def test_eval_mode_compiles_fullgraph_with_partitions():
    pred = DirectPredictor(8, partitions=2)
    for t in range(3):
        pred(features(20, 8, t))
    pred.eval()
    x = features(5, 8, 9)
    torch.testing.assert_close(torch.compile(pred, fullgraph=True)(x), pred(x))


# ------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("cast", ["half", "bfloat16", "double", "to_float16"])
@pytest.mark.parametrize("kwargs", [dict(zero_mean=True), dict(partitions=2)], ids=["zero_mean", "partitions"])
def test_casts_keep_the_statistics_in_float32_and_training_continues(cast, kwargs):
    d = 8
    pred, ref = twins(d, **kwargs)
    pred(features(30, d, 0)), ref(features(30, d, 0))
    pred = pred.to(torch.float16) if cast == "to_float16" else getattr(pred, cast)()
    dtype = pred.weight.dtype
    assert dtype == {"half": torch.float16, "to_float16": torch.float16, "bfloat16": torch.bfloat16,
                     "double": torch.float64}[cast]
    for name in ("corr", "mean", "thresholds", "planes"):
        if hasattr(pred, name):
            assert getattr(pred, name).dtype == torch.float32, name
            torch.testing.assert_close(getattr(pred, name), getattr(ref, name), rtol=0, atol=0)  # not rounded
    for t in range(1, 4):
        x = features(30, d, t, dtype=dtype)
        y = pred(x)
        assert y.dtype == dtype and y.shape == (30, d) and torch.isfinite(y).all()
        ref(x.float())  # the same values in float32
    assert pred.corr.dtype == torch.float32
    torch.testing.assert_close(pred.corr, ref.corr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred.weight.float(), ref.weight, rtol=1e-2, atol=1e-2)


def test_a_user_error_under_auto_is_raised_not_turned_into_a_fallback():
    """A wrong dtype that the reference refuses too must raise, with no fallback warning,
    and leave the fast path in place for the next (good) call."""
    from fastpred import backends

    calls = []

    def fast(corr, x, weight, mean=None):
        calls.append("fast")
        if corr.dtype != torch.float32:
            raise RuntimeError("expected float32")  # a kernel's dtype check
        return corr

    def ref(corr, x, weight, mean=None):
        raise RuntimeError("self and mat2 must have the same dtype")

    step = backends._falling_back(fast, ref, "test.corr_ema_")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="expected float32"):
            step(torch.zeros(2, 2, dtype=torch.float16), torch.ones(3, 2), 0.7)
        step(torch.zeros(2, 2), torch.ones(3, 2), 0.7)
    assert calls == ["fast", "fast"]


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs, name",
    [(dict(eps=float("nan")), "eps"), (dict(eps=float("inf")), "eps"), (dict(min_eig=float("inf")), "min_eig"),
     (dict(min_eig=float("nan")), "min_eig"), (dict(rho=float("nan")), "rho"), (dict(rho=float("inf")), "rho")],
)
def test_non_finite_arguments_are_refused_by_name(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DirectPredictor(16, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(), dict(partitions=2, zero_mean=True), dict(async_rebuild=True)],
                         ids=["plain", "partitions", "async"])
@pytest.mark.parametrize("attach", [False, True], ids=["per-call", "attach"])
def test_an_empty_batch_changes_no_statistics(kwargs, attach):
    d = 6
    pred, ref = twins(d, **kwargs)
    if attach:
        pred.attach(), ref.attach()
    for m in (pred, ref):
        m(features(20, d, 0))
        if attach:
            m.step()
    y = pred(torch.empty(0, d))
    assert y.shape == (0, d)
    if attach:
        pred.step()  # its step held one (empty) training call
        with pytest.warns(RuntimeWarning, match="no training-mode call since the last step"):
            ref.step()  # no call at all: named, and nothing counted
    for name in ("corr", "mean", "folded", "num_skipped", "thresholds"):
        if hasattr(pred, name):
            assert torch.equal(getattr(pred, name), getattr(ref, name)), name
    x = features(20, d, 1)
    torch.testing.assert_close(pred(x), ref(x))


def test_load_state_dict_is_all_or_nothing():
    small, big = DirectPredictor(4), DirectPredictor(5)
    for t in range(3):
        small(features(10, 4, t))
    before = copy.deepcopy(big.state_dict())
    with pytest.raises(RuntimeError, match="size mismatch for (weight|corr)"):
        big.load_state_dict(small.state_dict())
    for key, value in big.state_dict().items():
        assert torch.equal(value, before[key]), key
    # Non-strict loading of a partial state still works, and strict still names unexpected keys.
    partial = {k: v for k, v in small.state_dict().items() if k != "num_skipped"}
    other = DirectPredictor(4)
    result = other.load_state_dict(partial, strict=False)
    assert result.missing_keys == ["num_skipped"] and int(other.num_updates) == 3
    with pytest.raises(RuntimeError, match="Unexpected key"):
        other.load_state_dict({**small.state_dict(), "bogus": torch.zeros(1)})


# ------------------------------------------------------------------ keep-previous W_p on the device
@pytest.mark.parametrize("async_rebuild", [False, True])
def test_a_non_finite_rebuild_keeps_the_previous_weight(monkeypatch, async_rebuild):
    """GPU eigensolvers report failure lazily, as NaN eigenvalues, hence a NaN W_p: the
    predictor must keep the previous W_p (decided on the device) and count it."""
    d = 5
    pred = DirectPredictor(d, backend="torch", async_rebuild=async_rebuild)
    pred(features(20, d, 0)), pred(features(20, d, 1))
    kept = pred.state_dict()["weight"].clone()  # an async rebuild in flight collected
    monkeypatch.setattr(functional, "solve_weight", lambda corr, eig_map, **kw: torch.full_like(corr, float("nan")))
    with pytest.warns(RuntimeWarning, match="keeping the previous W_p"):
        y = pred(features(20, d, 2))  # its rebuild is computed by the NaN-returning solver
        pred.state_dict()  # collects an async rebuild
    assert torch.equal(pred.weight.detach(), kept) and torch.isfinite(y).all()
    assert int(pred.num_eigh_failures) == 1


# ------------------------------------------------------------------ copies
def test_deepcopy_and_pickle_drop_what_belongs_to_this_process():
    """An async CUDA rebuild in flight holds streams and events that cannot be pickled;
    the optimizer hook belongs to the original."""
    from fastpred.schedule import StreamRebuild

    class Unpicklable:
        def __reduce__(self):
            raise TypeError("cannot pickle 'torch.Stream' object")

    d = 4
    pred = DirectPredictor(d, async_rebuild=True)
    opt = torch.optim.SGD(pred.parameters(), lr=0.1)
    pred.attach(opt)
    x = features(10, d, 0)
    pred(x)
    opt.step()
    expected = copy.deepcopy(pred.state_dict())
    pred._schedule.pending = StreamRebuild(torch.zeros(d, d), None, Unpicklable())
    twin = copy.deepcopy(pred)
    pickle.loads(pickle.dumps(pred))
    assert twin._schedule.pending is None and twin._attachment is None and twin._schedule.owed
    for key, value in twin.state_dict().items():
        assert torch.equal(value, expected[key]), key
    twin(x)  # owes the rebuild, makes it, then one step per call
    assert int(twin.num_updates) == 2 and int(pred.num_updates) == 1


# ------------------------------------------------------------------ solver x partitions x async
@pytest.mark.parametrize("async_rebuild", [False, True])
@pytest.mark.parametrize("partitions", [0, 2])
@pytest.mark.parametrize("solver", ["eigh", "newton_schulz", "warm"])
def test_solver_partitions_async_combinations_match_the_synchronous_eigh_reference(solver, partitions, async_rebuild):
    d, n = 8, 48
    torch.manual_seed(5)
    pred = DirectPredictor(d, solver=solver, partitions=partitions, async_rebuild=async_rebuild, rho=0.9)
    torch.manual_seed(5)
    sync = DirectPredictor(d, solver=solver, partitions=partitions)
    torch.manual_seed(5)
    exact = DirectPredictor(d, partitions=partitions)
    tolerance = {"eigh": 1e-5, "warm": 1e-3, "newton_schulz": 2e-2}[solver]
    exact.rho = sync.rho = 0.9
    for t in range(6):
        x = features(n, d, t)
        y, y_sync, y_exact = pred(x), sync(x), exact(x)
        assert torch.equal(y, y_sync), t  # async is bit-identical to synchronous
        scale = y_exact.abs().max()
        assert (y - y_exact).abs().max() <= tolerance * scale, (t, (y - y_exact).abs().max() / scale)
    torch.testing.assert_close(pred.corr, exact.corr, rtol=1e-6, atol=1e-6)
