"""The one step path of DirectPredictor on every route: float32 statistics under autocast,
no stale W_p, attached and per-call runs equal, misuse named once, bad input refused.

Expected values come from float64 models written here (outer products, np.linalg.eigh),
never from the code under test.
"""
import copy
import gc
import pickle
import warnings
import weakref

import numpy as np
import pytest
import torch

from fastpred import DirectPredictor
from reference_numpy import DirectPredNumpy, directpred_weight


def features(n, d, seed, scale=1.0, shift=0.2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * scale + shift


def float64_corr(xs_per_step, rho):
    """F after the steps, each step's calls folded as one batch (Eq. 19 with the first
    batch overwriting), in float64 from per-sample outer products."""
    corr = None
    for xs in xs_per_step:
        x = np.concatenate([np.asarray(v, dtype=np.float64) for v in xs])
        batch = np.mean([np.outer(v, v) for v in x], axis=0)
        corr = batch if corr is None else rho * corr + (1 - rho) * batch
    return corr


def rel(a, b):
    a = np.asarray(a, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ------------------------------------------------------------------ float32 statistics under autocast
def run_route(route, dtype, steps, d=16, partitions=0):
    """Two views per step through ``route``; returns the predictor."""
    torch.manual_seed(0)
    pred = DirectPredictor(d, partitions=partitions)
    opt = torch.optim.SGD(pred.parameters(), lr=0.0)
    if route == "attached":
        pred.attach(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for views in steps:
            with torch.autocast("cpu", dtype=dtype):
                if route == "attached":
                    for v in views:
                        pred(v)
                else:
                    pred(torch.cat(views))
            opt.step()
    return pred


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("route", ["attached", "per-call"])
def test_statistics_are_float32_under_autocast(route, dtype):
    """attach() + bf16 autocast: F was off by 3.8e-3 against float64 (3.7e-7 elsewhere)."""
    d = 16
    steps = [(features(64, d, 2 * t, 3.0, 1.0), features(64, d, 2 * t + 1, 3.0, 1.0)) for t in range(4)]
    pred = run_route(route, dtype, steps, d)
    assert rel(pred.corr.numpy(), float64_corr(steps, 0.3)) < 1e-5
    assert pred.corr.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("route", ["attached", "per-call"])
def test_partition_statistics_are_float32_under_autocast(route, dtype):
    d = 8
    steps = [(features(48, d, 2 * t, 3.0, 1.0), features(48, d, 2 * t + 1, 3.0, 1.0)) for t in range(3)]
    pred = run_route(route, dtype, steps, d, partitions=2)
    ref = run_route(route, torch.float32, steps, d, partitions=2)  # the same splits without autocast
    torch.testing.assert_close(pred.thresholds, ref.thresholds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pred.corr, ref.corr, rtol=1e-5, atol=1e-5)
    assert torch.equal(pred.folded, ref.folded)


def test_fp16_autocast_of_unnormalised_features_does_not_overflow_f():
    """8192 x 64 features 3 randn + 1 under fp16 autocast: x^T x overflowed fp16, F became
    NaN for good and W_p stayed at its random init, with num_skipped 0."""
    d, n = 64, 8192
    x = features(n, d, 0, 3.0, 1.0)
    torch.manual_seed(0)
    pred = DirectPredictor(d)
    init = pred.weight.detach().clone()
    opt = torch.optim.SGD(pred.parameters(), lr=0.0)
    pred.attach(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-finite eigenvalues" warning either
        with torch.autocast("cpu", dtype=torch.float16):
            pred(x)
        opt.step()
    expected = float64_corr([[x]], 0.3)
    assert torch.isfinite(pred.corr).all() and rel(pred.corr.numpy(), expected) < 1e-5
    assert not torch.equal(pred.weight.detach(), init)
    np.testing.assert_allclose(pred.weight.detach().numpy(), directpred_weight(expected, 0.1, 0.5, "relative", 1e-4),
                               atol=1e-4)


# ------------------------------------------------------------------ no stale W_p; attached == per-call
@pytest.mark.parametrize("kwargs", [dict(), dict(freq=3), dict(power=1.0), dict(async_rebuild=True)],
                         ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
def test_after_the_last_step_eval_and_state_dict_see_the_last_batch(kwargs):
    """Without attach, W_p was one step stale after the last step (0.13 off in 20 steps)."""
    d, steps = 10, 7
    xs = [features(40, d, t) for t in range(steps)]
    torch.manual_seed(0)
    pred = DirectPredictor(d, backend="torch", **kwargs)
    model = DirectPredNumpy(pred.weight.detach().numpy(), **{k: v for k, v in kwargs.items() if k != "async_rebuild"})
    for x in xs:
        pred(x)
        model.step(x.numpy())
    expected = model.next_weight()
    probe = features(5, d, 99)
    pred.eval()
    np.testing.assert_allclose(pred(probe).detach().numpy(), probe.double().numpy() @ expected.T, atol=1e-4)
    np.testing.assert_allclose(pred.state_dict()["weight"].numpy(), expected, atol=1e-4)
    np.testing.assert_allclose(pred.weight.detach().numpy(), expected, atol=1e-4)


@pytest.mark.parametrize("kwargs", [dict(), dict(freq=2), dict(partitions=2, zero_mean=True)],
                         ids=["default", "freq=2", "partitions"])
def test_attached_per_view_and_per_call_concatenated_runs_end_equal(kwargs):
    d = 8
    torch.manual_seed(0)
    attached = DirectPredictor(d, **kwargs)
    per_call = copy.deepcopy(attached)
    opts = [torch.optim.SGD(m.parameters(), lr=0.0) for m in (attached, per_call)]
    attached.attach(opts[0])
    for t in range(6):
        v1, v2 = features(32, d, 2 * t), features(32, d, 2 * t + 1)
        if kwargs.get("partitions"):  # one split for both: per-view calls split each view at its own mean
            attached(torch.cat([v1, v2]))
        else:
            attached(v1), attached(v2)
        per_call(torch.cat([v1, v2]))
        for o in opts:
            o.step()
    a, p = attached.state_dict(), per_call.state_dict()
    for key in ("corr", "mean", "weight", "num_updates", "folded"):
        torch.testing.assert_close(a[key], p[key], rtol=1e-5, atol=1e-6, msg=key)


# ------------------------------------------------------------------ misuse, named once
def warned(record, text):
    return [w for w in record if text in str(w.message)]


def test_an_optimizer_step_without_a_training_call_warns_once_and_is_no_step():
    """A predictor left in eval mode: num_updates counted, folded 0, W_p became 0.1 I."""
    d = 6
    pred = DirectPredictor(d)
    opt = torch.optim.SGD(pred.parameters(), lr=0.1)
    pred.attach(opt)
    init = pred.weight.detach().clone()
    pred.eval()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            pred(features(8, d, 0))
            opt.step()
    assert len(warned(record, "no training-mode call")) == 1
    assert int(pred.num_updates) == 0 and torch.equal(pred.weight.detach(), init)


def test_manual_step_while_attached_to_an_optimizer_is_an_error():
    """attach(opt) + step() made 10 updates for 5 folds."""
    pred = DirectPredictor(4)
    opt = torch.optim.SGD(pred.parameters(), lr=0.1)
    pred.attach(opt)
    pred(features(8, 4, 0))
    with pytest.raises(RuntimeError, match="attached to an optimizer"):
        pred.step()
    opt.step()
    assert int(pred.num_updates) == 1


def test_per_view_calls_without_attach_warn_once():
    d = 4
    pred = DirectPredictor(d)
    opt = torch.optim.SGD(pred.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for t in range(3):
            pred(features(8, d, 2 * t)), pred(features(8, d, 2 * t + 1))
            opt.step()
    assert len(warned(record, "training calls between two optimizer steps")) == 1


def test_per_view_calls_warn_at_the_step_of_the_optimizer_holding_the_predictor():
    """Another model's optimizer stepping in between neither warns nor hides the misuse."""
    d = 4
    pred, other = DirectPredictor(d), torch.nn.Linear(d, d)
    opt = torch.optim.SGD(pred.parameters(), lr=0.1)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for t in range(3):
            pred(features(8, d, 2 * t)), pred(features(8, d, 2 * t + 1))
            other_opt.step()
            assert (t == 0) == (len(record) == 0)  # not named by the unrelated step
            opt.step()
    assert [str(w.message).split(" between")[0] for w in record] == ["DirectPredictor: 2 training calls"]


def test_an_unrelated_optimizer_step_does_not_warn_about_a_per_call_predictor():
    """A global optimizer hook named every per-call predictor of the process at any
    optimizer's step ("3 training calls" from predictors of other tests)."""
    d = 4
    pred = DirectPredictor(d)
    torch.optim.SGD(pred.parameters(), lr=0.1)  # never stepped: F fitted by calls alone
    for t in range(3):
        pred(features(8, d, t))
    other = torch.nn.Linear(d, d)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other(features(8, d, 9)).sum().backward()
        other_opt.step()


def test_the_per_view_check_follows_a_copy_and_keeps_no_predictor_alive():
    """A deepcopy or unpickled copy is checked against its own optimizer; the check
    holds no strong reference to a predictor."""
    d = 4
    pred = DirectPredictor(d)
    opt = torch.optim.SGD(pred.parameters(), lr=0.1)
    pred(features(8, d, 0))
    opt.step()
    for twin in (copy.deepcopy(pred), pickle.loads(pickle.dumps(pred))):
        twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            twin(features(8, d, 1)), twin(features(8, d, 2))
            opt.step()  # the original's optimizer: not the twin's
            assert not record
            twin_opt.step()
        assert len(warned(record, "2 training calls between two optimizer steps")) == 1
    ref = weakref.ref(pred)
    del pred, opt, twin, twin_opt
    gc.collect()
    assert ref() is None


def test_misuse_warnings_point_at_the_user_code():
    """stacklevel=4 pointed into torch's optimizer.py / _dynamo/eval_frame.py."""
    d = 4
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        per_view = DirectPredictor(d)
        opt = torch.optim.SGD(per_view.parameters(), lr=0.1)
        per_view(features(8, d, 0)), per_view(features(8, d, 1))
        opt.step()  # per-view calls without attach
        idle = DirectPredictor(d)
        idle_opt = torch.optim.SGD(idle.parameters(), lr=0.1)
        idle.attach(idle_opt)
        idle_opt.step()  # no training call since the last step
        DirectPredictor(d, freq=2).attach(torch.optim.SGD(torch.nn.Linear(d, d).parameters(), lr=0.1))
        skipping = DirectPredictor(d)
        skipping(torch.full((8, d), float("nan")))  # a skipped step
    keys = ["training calls between", "no training-mode call", "never trained", "were skipped"]
    assert [next(k for k in keys if k in str(w.message)) for w in record] == keys
    assert [w.filename for w in record] == [__file__] * len(keys)


def test_one_call_per_optimizer_step_without_attach_does_not_warn():
    d = 4
    pred = DirectPredictor(d)
    opt = torch.optim.SGD(pred.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in range(3):
            pred(features(8, d, t))
            opt.step()


def test_freq_above_one_with_weight_outside_the_optimizer_warns_at_attach():
    pred = DirectPredictor(4, freq=2)
    other = torch.nn.Linear(4, 4)
    with pytest.warns(RuntimeWarning, match="never trained between rebuilds"):
        pred.attach(torch.optim.SGD(other.parameters(), lr=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trained = DirectPredictor(4, freq=2)
        trained.attach(torch.optim.SGD(trained.parameters(), lr=0.1))


def test_reattaching_to_the_same_optimizer_is_idempotent():
    """Lightning's second fit / lr_find then fit: "already attached"."""
    pred = DirectPredictor(4)
    opt = torch.optim.SGD(pred.parameters(), lr=0.1)
    first = pred.attach(opt)
    assert pred.attach(opt) is first
    pred(features(8, 4, 0))
    opt.step()
    assert int(pred.num_updates) == 1  # one hook, one step
    with pytest.raises(RuntimeError, match="already attached"):
        pred.attach(torch.optim.SGD(pred.parameters(), lr=0.1))


def test_a_stale_handle_removes_nothing():
    """h1.remove(); h2 = attach(); h1.remove() detached h2, then "call attach() first"."""
    pred = DirectPredictor(4)
    opt = torch.optim.SGD(pred.parameters(), lr=0.1)
    h1 = pred.attach(opt)
    h1.remove()
    h2 = pred.attach(opt)
    h1.remove()
    pred(features(8, 4, 0)), pred(features(8, 4, 1))
    opt.step()
    assert int(pred.num_updates) == 1
    h2.remove()


# ------------------------------------------------------------------ bad input
def test_loading_a_non_finite_state_is_refused_and_changes_nothing():
    """A NaN corr was accepted: F NaN for good, W_p frozen."""
    pred = DirectPredictor(4)
    pred(features(8, 4, 0))
    before = copy.deepcopy(pred.state_dict())
    bad = copy.deepcopy(before)
    bad["corr"][1, 2] = float("nan")
    with pytest.raises(RuntimeError, match="corr holds non-finite values"):
        pred.load_state_dict(bad)
    for key, value in pred.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("kwargs", [dict(freq=2), dict(async_rebuild=True)], ids=["freq=2", "async"])
def test_eval_mode_sees_the_last_step_and_traces_fullgraph(kwargs):
    """The rebuild owed by the last per-call step is installed by eval(), so eval calls need
    no eager catch-up and still trace as one graph."""
    d = 6
    torch.manual_seed(0)
    pred = DirectPredictor(d, backend="torch", **kwargs)
    model = DirectPredNumpy(pred.weight.detach().numpy(), freq=kwargs.get("freq", 1))
    for t in range(3):
        x = features(24, d, t)
        pred(x)
        model.step(x.numpy())
    pred.eval()
    probe = features(4, d, 50)
    y = torch.compile(pred, fullgraph=True, backend="eager")(probe)
    np.testing.assert_allclose(y.detach().numpy(), probe.double().numpy() @ model.next_weight().T, atol=1e-4)
