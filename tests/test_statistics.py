"""A step is judged by its own statistics (issue 25, item 1): a step whose accumulated
moments are not finite is skipped and counted, and F never takes a non-finite value.

50 000 rows of features 9e16: every feature is finite and far from float32's limit,
but x^T x sums 50 000 x 8.1e33 > 3.4e38 and overflows. The expected F and W_p come
from the float64 NumPy model (tests/reference_numpy.py) fed the good batches only."""
import numpy as np
import pytest
import torch

from fastpred import DirectPredictor
from reference_numpy import DirectPredNumpy

D = 6
HUGE = 9e16  # below the old per-feature cut-off (1e17); its x^T x over 50 000 rows is inf in float32


def good_batches(n_steps, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(D, D, generator=g) / D**0.5 + torch.eye(D)
    return [torch.randn(n, D, generator=g) @ mix + 0.2 for _ in range(n_steps)]


def overflowing(rows=50_000):
    return torch.full((rows, D), HUGE)


def model_of(pred, **cfg):
    return DirectPredNumpy(pred.weight.detach().numpy(), **cfg)


def assert_matches(pred, model):
    np.testing.assert_allclose(pred.corr.numpy(), model.F, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred.state_dict()["weight"].numpy(), model.next_weight(), atol=2e-4)


@pytest.mark.parametrize("zero_mean", [False, True])
def test_per_call_overflowing_step_is_skipped_and_later_steps_update(zero_mean):
    xs = good_batches(4)
    torch.manual_seed(0)
    pred = DirectPredictor(D, zero_mean=zero_mean)
    model = model_of(pred, zero_mean=zero_mean)
    pred(xs[0]); model.step(xs[0].numpy())
    with pytest.warns(RuntimeWarning, match="skipped"):
        pred(overflowing())
    assert int(pred.num_skipped) == 1 and int(pred.num_updates) == 2
    assert torch.isfinite(pred.corr).all() and torch.isfinite(pred.mean).all()
    assert_matches(pred, model)  # F and W_p as after the first batch
    for x in xs[1:]:
        before = pred.weight.detach().clone()
        pred(x); model.step(x.numpy())
        assert not torch.equal(pred.weight.detach(), before)  # W_p keeps updating
        assert_matches(pred, model)
    assert int(pred.num_eigh_failures) == 0


def test_first_step_overflowing_leaves_f_unset():
    x = good_batches(1)[0]
    pred = DirectPredictor(D)
    with pytest.warns(RuntimeWarning, match="skipped"):
        pred(overflowing())
    assert int(pred.folded) == 0 and torch.equal(pred.corr, torch.zeros(D, D))
    pred(x)
    np.testing.assert_allclose(pred.corr.numpy(), (x.double().T @ x.double() / len(x)).numpy(), rtol=1e-5)


def test_attached_step_whose_views_overflow_only_together_is_skipped():
    """Two per-view calls of 25 000 rows: each view's x^T x (2.0e38) is finite, their sum
    is not. The step, not the call, is what overflows."""
    xs = good_batches(3)
    torch.manual_seed(0)
    pred = DirectPredictor(D)
    model = model_of(pred)
    opt = torch.optim.SGD(pred.parameters(), lr=0.0)
    pred.attach(opt)
    pred(xs[0][:16]); pred(xs[0][16:]); opt.step()
    model.step_calls([xs[0][:16].numpy(), xs[0][16:].numpy()])
    pred(overflowing(25_000)); pred(overflowing(25_000))
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert int(pred.num_skipped) == 1 and torch.isfinite(pred.corr).all()
    assert_matches(pred, model)
    for x in xs[1:]:
        pred(x[:16]); pred(x[16:]); opt.step()
        model.step_calls([x[:16].numpy(), x[16:].numpy()])
        assert_matches(pred, model)


def test_partitions_overflowing_step_is_skipped():
    xs = good_batches(3, n=64)
    torch.manual_seed(0)
    pred = DirectPredictor(D, partitions=2)
    torch.manual_seed(0)
    clean = DirectPredictor(D, partitions=2)
    pred(xs[0]); clean(xs[0])
    with pytest.warns(RuntimeWarning, match="skipped"):
        pred(overflowing())
    for x in xs[1:]:
        pred(x); clean(x)
    assert int(pred.num_skipped) == 1
    for name in ("corr", "thresholds", "folded", "weight"):
        torch.testing.assert_close(getattr(pred, name), getattr(clean, name), msg=name)


def test_non_finite_features_are_still_skipped():
    """The moments carry a non-finite feature into the judgement (its square sits on the
    diagonal of x^T x): NaN, +inf and -inf alike."""
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = good_batches(1)[0].clone()
        x[3, 2] = bad
        pred = DirectPredictor(D)
        with pytest.warns(RuntimeWarning, match="skipped"):
            pred(x)
        assert int(pred.num_skipped) == 1 and int(pred.folded) == 0 and torch.equal(pred.corr, torch.zeros(D, D))
