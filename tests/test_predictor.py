"""DirectPredictor step by step against the independent NumPy model, plus its contracts."""
import copy
import warnings

import numpy as np
import pytest
import torch

from fastpred import DirectPredictor
from reference_numpy import DirectPredNumpy


def batches(n_steps, n, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    return [(torch.randn(n, d, generator=g) @ mix + 0.2).to(dtype) for _ in range(n_steps)]


CONFIGS = [
    dict(freq=1),
    dict(freq=3),
    dict(eps_mode="absolute"),
    dict(power=1.0),
    dict(zero_mean=True),
    dict(rho=0.0, eps=0.0),
    dict(freq=3, eps_mode="absolute", power=1.0, zero_mean=True, rho=0.5),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_every_step_matches_numpy_model(cfg):
    d, n = 10, 48
    torch.manual_seed(0)
    pred = DirectPredictor(d, backend="torch", **cfg)
    model = DirectPredNumpy(pred.weight.detach().numpy(), **cfg)
    for step, x in enumerate(batches(8, n, d)):
        y = pred(x)
        y_ref = model.step(x.numpy())
        scale = np.abs(model.W).max()
        np.testing.assert_allclose(pred.state_dict()["weight"].numpy(), model.next_weight(), atol=2e-4 * scale,
                                   err_msg=f"W at {step}")  # includes this step's batch: never stale
        np.testing.assert_allclose(y.detach().numpy(), y_ref, atol=2e-4 * np.abs(y_ref).max(), err_msg=f"y at {step}")
        np.testing.assert_allclose(pred.corr.numpy(), model.F, rtol=1e-5, atol=1e-5 * np.abs(model.F).max())
        if cfg.get("zero_mean"):
            np.testing.assert_allclose(pred.mean.numpy(), model.m, rtol=1e-5, atol=1e-6)
    assert int(pred.num_updates) == 8


def test_rebuilt_weight_is_symmetric_and_commutes_with_corr():
    pred = DirectPredictor(12)
    for x in batches(3, 64, 12):
        pred(x)
    # W was built from F before the last update: rebuild from the current F to compare.
    assert pred.refresh()
    w, f = pred.weight.detach().double(), pred.corr.double()
    assert (w - w.T).abs().max() < 1e-6
    assert (w @ f - f @ w).abs().max() < 1e-4 * w.abs().max() * f.abs().max()


def test_gradients_reach_input_and_reach_weight_only_between_rebuilds():
    x = batches(1, 16, 6)[0].requires_grad_()
    pred = DirectPredictor(6, freq=1)
    pred(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert pred.weight.grad is None and not pred.weight.requires_grad
    pred5 = DirectPredictor(6, freq=5)
    pred5(x.detach()).sum().backward()
    assert pred5.weight.grad is not None and pred5.weight.grad.abs().sum() > 0


def test_sgd_between_rebuilds_is_overwritten_at_the_rebuild():
    d = 8
    pred = DirectPredictor(d, freq=2, backend="torch")
    opt = torch.optim.SGD(pred.parameters(), lr=0.1)
    xs = batches(4, 32, d)
    for x in xs[:2]:  # steps 0 and 1 (step 1 starts with the rebuild after update 0)
        opt.zero_grad()
        pred(x).pow(2).mean().backward()
        opt.step()
    trained = pred.weight.detach().clone()
    pred(xs[2])  # step 2: update 1 was the last, 1 % 2 != 0 -> no rebuild
    torch.testing.assert_close(pred.weight.detach(), trained)
    pred(xs[3])  # step 3: after update 2, 2 % 2 == 0 -> rebuild from F
    assert not torch.allclose(pred.weight.detach(), trained)


def test_eval_mode_changes_nothing():
    pred = DirectPredictor(5)
    for x in batches(2, 20, 5):
        pred(x)
    before = copy.deepcopy(pred.state_dict())
    pred.eval()
    y = pred(batches(1, 7, 5, seed=3)[0])
    assert y.shape == (7, 5)
    for k, v in pred.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_state_dict_round_trip_continues_bit_identically():
    d = 9
    xs = batches(10, 40, d)
    a = DirectPredictor(d, freq=2)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05)
    for x in xs[:5]:
        opt_a.zero_grad(); a(x).pow(2).mean().backward(); opt_a.step()
    b = DirectPredictor(d, freq=2)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for x in xs[5:]:
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad(); m(x).pow(2).mean().backward(); o.step()
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_deepcopy_is_independent():
    a = DirectPredictor(4)
    a(batches(1, 10, 4)[0])
    b = copy.deepcopy(a)
    b(batches(1, 10, 4, seed=1)[0])
    assert int(a.num_updates) == 1 and int(b.num_updates) == 2
    assert not torch.equal(a.corr, b.corr)


def test_non_finite_batch_is_skipped_counted_and_warned():
    d = 6
    xs = batches(3, 20, d)
    clean = DirectPredictor(d)
    dirty = DirectPredictor(d)
    dirty.load_state_dict(clean.state_dict())
    bad = xs[1].clone()
    bad[3, 2] = float("nan")
    clean(xs[0]); clean(xs[2])
    dirty(xs[0])
    with pytest.warns(RuntimeWarning, match="skipped"):
        y = dirty(bad)
    assert y.shape == (20, d)
    dirty(xs[2])
    torch.testing.assert_close(dirty.corr, clean.corr)
    assert int(dirty.num_skipped) == 1 and int(dirty.num_updates) == 3


def test_first_batch_non_finite_then_next_batch_sets_corr():
    d = 4
    pred = DirectPredictor(d)
    bad = torch.full((5, d), float("inf"))
    with pytest.warns(RuntimeWarning):
        pred(bad)
    x = batches(1, 12, d)[0]
    pred(x)
    torch.testing.assert_close(pred.corr, x.T @ x / 12)


def test_failed_eigendecomposition_keeps_previous_weight(monkeypatch):
    d = 5
    pred = DirectPredictor(d, backend="torch")
    xs = batches(3, 20, d)
    pred(xs[0]); pred(xs[1])
    kept = pred.weight.detach().clone()

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("injected failure")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.warns(RuntimeWarning, match="keeping the previous W_p"):
        pred(xs[2])
    torch.testing.assert_close(pred.weight.detach(), kept)
    assert int(pred.num_eigh_failures) == 1
    assert torch.isfinite(pred.corr).all()


def test_bfloat16_autocast_input():
    d = 16
    pred = DirectPredictor(d)
    ref = DirectPredictor(d)
    ref.load_state_dict(pred.state_dict())
    xs = batches(3, 32, d, dtype=torch.bfloat16)
    for x in xs:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = pred(x)
        assert y.dtype == torch.bfloat16
        ref(x.float())  # the same bf16 values, upcast by hand
    assert pred.corr.dtype == torch.float32
    torch.testing.assert_close(pred.corr, ref.corr, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_without_autocast(dtype):
    pred = DirectPredictor(8)
    y = pred(batches(1, 10, 8, dtype=dtype)[0])
    assert y.dtype == dtype and pred.corr.dtype == torch.float32


def test_eval_forward_compiles():
    pred = DirectPredictor(8).eval()
    x = torch.randn(4, 8)
    compiled = torch.compile(pred, fullgraph=True)
    torch.testing.assert_close(compiled(x), pred(x))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(dim=0), ValueError, "dim"),
        (dict(dim=2.5), ValueError, "dim"),
        (dict(dim=4, rho=1.0), ValueError, "rho"),
        (dict(dim=4, rho=-0.1), ValueError, "rho"),
        (dict(dim=4, freq=0), ValueError, "freq"),
        (dict(dim=4, power=0.0), ValueError, "power"),
        (dict(dim=4, eps_mode="both"), ValueError, "eps_mode"),
        (dict(dim=4, backend="fortran"), ValueError, "backend"),
    ],
)
def test_bad_constructor_arguments_are_named(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        DirectPredictor(**kwargs)


@pytest.mark.parametrize(
    "x, exc, match",
    [
        (torch.randn(4), ValueError, "shape"),
        (torch.randn(2, 3, 4), ValueError, "shape"),
        (torch.randn(3, 5), ValueError, "shape"),
        (torch.ones(3, 4, dtype=torch.int64), TypeError, "floating"),
        (torch.ones(3, 4, dtype=torch.complex64), TypeError, "floating"),
        (torch.randn(3, 4, device="meta"), ValueError, "device"),
    ],
)
def test_bad_inputs_are_named(x, exc, match):
    with pytest.raises(exc, match=match):
        DirectPredictor(4)(x)


def test_unavailable_backend_says_what_to_install(monkeypatch):
    import fastpred.backends as b

    monkeypatch.setitem(b._PROVIDERS, "cupy", ("fastpred.backends._no_such_module", "Install the CUDA extra."))
    monkeypatch.setattr(b, "_resolved", {})
    pred = DirectPredictor(4, backend="cupy")
    with pytest.raises(RuntimeError, match="Install the CUDA extra"):
        pred(torch.randn(3, 4))
