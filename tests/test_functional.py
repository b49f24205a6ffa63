"""fastpred.functional against hand-computed values and the NumPy model."""
import numpy as np
import pytest
import torch

from fastpred import DirectPredictor
from fastpred import functional as F
from fastpred.eig_map import EigMap
from reference_numpy import directpred_weight as np_weight
from reference_numpy import eig_map as np_eig_map


def test_eig_map_hand_computed_values():
    s = torch.tensor([4.0, 1.0, 0.0, -1.0])
    # relative: s/max = [1, .25, 0, 0] -> sqrt -> [1, .5, 0, 0] -> + 0.1
    rel = F.eig_map(s, eps=0.1, power=0.5, eps_mode="relative", min_eig=1e-4)
    torch.testing.assert_close(rel, torch.tensor([1.1, 0.6, 0.1, 0.1]))
    # absolute (Eq. 18): sqrt([4, 1, 0, 0]) + 0.1 * 4
    ab = F.eig_map(s, eps=0.1, power=0.5, eps_mode="absolute", min_eig=1e-4)
    torch.testing.assert_close(ab, torch.tensor([2.4, 1.4, 0.4, 0.4]))
    # power 1 (DirectCopy-style), eps 0: the clamp at min_eig shows
    cp = F.eig_map(s, eps=0.0, power=1.0, eps_mode="relative", min_eig=1e-4)
    torch.testing.assert_close(cp, torch.tensor([1.0, 0.25, 1e-4, 1e-4]))


@pytest.mark.parametrize("eps_mode", ["relative", "absolute"])
def test_zero_correlation_gives_documented_finite_weight(eps_mode):
    w = F.directpred_weight(torch.zeros(5, 5), eps=0.1, eps_mode=eps_mode)
    expected = 0.1 * torch.eye(5) if eps_mode == "relative" else torch.zeros(5, 5)
    torch.testing.assert_close(w, expected)


@pytest.mark.parametrize("eps_mode", ["relative", "absolute"])
@pytest.mark.parametrize("power", [0.5, 1.0])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_eig_map_matches_numpy(eps_mode, power, eps):
    s = torch.linspace(-0.5, 3.0, 17, dtype=torch.float64)
    got = F.eig_map(s, eps=eps, power=power, eps_mode=eps_mode, min_eig=1e-4)
    np.testing.assert_allclose(got.numpy(), np_eig_map(s.numpy(), eps, power, eps_mode, 1e-4), rtol=1e-12)


def _data(n, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    return (torch.randn(n, d, generator=g) @ mix + 0.3).to(dtype)


@pytest.mark.parametrize("shape", [(), (3,)])
def test_corr_ema_matches_outer_product_average(shape):
    d, n, rho = 7, 33, 0.3
    xs = [_data(n, d, seed=i) for i in range(3)]
    if shape:
        xs = [torch.stack([_data(n, d, seed=10 * i + b) for b in range(shape[0])]) for i in range(3)]
    corr = torch.zeros(*shape, d, d)
    mean = torch.zeros(*shape, d)
    ref_f = ref_m = None
    for i, x in enumerate(xs):
        F.corr_ema_(corr, x, rho, first=i == 0, mean=mean, backend="torch")
        xd = x.double().numpy()
        batch = np.einsum("...ni,...nj->...ij", xd, xd) / n
        bmean = xd.mean(axis=-2)
        ref_f = batch if ref_f is None else rho * ref_f + (1 - rho) * batch
        ref_m = bmean if ref_m is None else rho * ref_m + (1 - rho) * bmean
    np.testing.assert_allclose(corr.numpy(), ref_f, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mean.numpy(), ref_m, rtol=1e-5, atol=1e-6)


def test_corr_ema_first_ignores_garbage_in_corr():
    corr = torch.full((4, 4), float("nan"))
    x = _data(9, 4)
    F.corr_ema_(corr, x, 0.3, first=True)
    torch.testing.assert_close(corr, x.T @ x / 9)


def test_corr_ema_accepts_half_precision_and_accumulates_in_float32():
    x = _data(50, 6, dtype=torch.float16)
    corr = torch.zeros(6, 6)
    F.corr_ema_(corr, x, 0.3, first=True)
    assert corr.dtype == torch.float32
    torch.testing.assert_close(corr, x.double().T @ x.double() / 50, rtol=1e-5, atol=1e-6, check_dtype=False)


@pytest.mark.parametrize("eps_mode", ["relative", "absolute"])
@pytest.mark.parametrize("power", [0.5, 1.0])
def test_directpred_weight_matches_numpy_and_shares_eigenvectors(eps_mode, power):
    x = _data(200, 12)
    corr = x.T @ x / 200
    w = F.directpred_weight(corr, eps=0.1, power=power, eps_mode=eps_mode)
    ref = np_weight(corr.double().numpy(), 0.1, power, eps_mode, 1e-4)
    np.testing.assert_allclose(w.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    torch.testing.assert_close(w, w.T, rtol=0, atol=1e-6)
    # Same eigenvectors <=> W and F commute.
    comm = w.double() @ corr.double() - corr.double() @ w.double()
    assert comm.abs().max() < 1e-4 * corr.abs().max() * w.abs().max()


def test_directpred_weight_batched_equals_loop():
    corrs = torch.stack([(lambda x: x.T @ x / 40)(_data(40, 9, seed=s)) for s in range(4)])
    batched = F.directpred_weight(corrs)
    for b in range(4):
        torch.testing.assert_close(batched[b], F.directpred_weight(corrs[b]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eps_mode", ["relative", "absolute"])
def test_negative_eps_is_refused_by_name(eps_mode):
    """eps < 0 gave W_p = min_eig I (relative) or a negative-definite W_p (absolute)."""
    with pytest.raises(ValueError, match="eps must be >= 0"):
        F.directpred_weight(torch.eye(3), eps=-0.5, eps_mode=eps_mode)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        DirectPredictor(3, eps=-0.1)


def test_eigh_falls_back_to_float64(monkeypatch):
    corr = (lambda x: x.T @ x / 30)(_data(30, 5))
    real_eigh = torch.linalg.eigh
    calls = []

    def flaky(a, *args, **kwargs):
        calls.append(a.dtype)
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("injected failure")
        return real_eigh(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    w = F.directpred_weight(corr, backend="torch")
    assert calls == [torch.float32, torch.float64]
    np.testing.assert_allclose(w.numpy(), np_weight(corr.double().numpy(), 0.1, 0.5, "relative", 1e-4), atol=1e-5)


def test_eigh_error_when_every_attempt_fails(monkeypatch):
    def broken(a, *args, **kwargs):
        raise torch.linalg.LinAlgError("injected failure")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.raises(F.EighError, match="injected failure"):
        F.directpred_weight(torch.eye(3), backend="torch")


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(power=0.0), ValueError, "power"),
        (dict(power=-1.0), ValueError, "power"),
        (dict(eps_mode="scaled"), ValueError, "eps_mode"),
        (dict(eps="0.1"), TypeError, "eps"),
        (dict(backend="cuda-magic"), ValueError, "backend"),
    ],
)
def test_bad_map_arguments_are_named(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        F.directpred_weight(torch.eye(3), **kwargs)


@pytest.mark.parametrize("weight", [1.0, torch.tensor(1.0)], ids=["float", "tensor"])
def test_first_update_overwrites_nan_corr_and_mean(weight):
    from fastpred.backends import reference

    corr, mean = torch.full((2, 3, 4, 4), float("nan")), torch.full((2, 3, 4), float("nan"))
    x = torch.randn(2, 3, 9, 4)
    reference.corr_ema_(corr, x, weight, mean)
    torch.testing.assert_close(corr, x.mT @ x / 9)
    torch.testing.assert_close(mean, x.mean(-2))


def test_corr_ema_two_batch_dims_matches_loop():
    corr = torch.rand(2, 3, 5, 5)
    x = torch.randn(2, 3, 11, 5)
    expected = torch.stack([torch.stack([0.7 * corr[i, j] + 0.3 * x[i, j].T @ x[i, j] / 11 for j in range(3)]) for i in range(2)])
    F.corr_ema_(corr, x, 0.7, backend="torch")
    torch.testing.assert_close(corr, expected)


def test_auto_falls_back_to_reference_when_a_fast_step_breaks(monkeypatch):
    """A fast kernel that fails (e.g. does not compile on this GPU) must not stop a run."""
    import sys
    import types

    import fastpred.backends as b

    broken = types.ModuleType("fastpred.backends._broken_for_test")

    def corr_ema_(*args, **kwargs):
        raise RuntimeError("kernel did not compile")

    broken.corr_ema_ = corr_ema_
    monkeypatch.setitem(sys.modules, broken.__name__, broken)
    monkeypatch.setitem(b._PROVIDERS, "csrc", (broken.__name__, ""))
    monkeypatch.setattr(b, "_auto_choice", lambda device: {s: ("csrc" if s == "corr_ema_" else "torch") for s in b.STEPS})
    monkeypatch.setattr(b, "_resolved", {})
    corr, x = torch.zeros(4, 4), torch.randn(10, 4)
    with pytest.warns(RuntimeWarning, match="kernel did not compile") as record:
        F.corr_ema_(corr, x, 0.3, first=True)
    assert [r.filename for r in record] == [__file__]  # the user's line, not fastpred's
    torch.testing.assert_close(corr, x.T @ x / 10)
    with pytest.raises(RuntimeError, match="kernel did not compile"):
        F.corr_ema_(corr, x, 0.3, backend="csrc")  # asked for by name: no fallback


def test_moments_summed_over_calls_equal_the_moments_of_the_concatenation():
    """The statistics of a step made of several calls (views, micro-batches), per half-space."""
    d = 5
    xs = [_data(n, d, seed=i) for i, n in enumerate((7, 12, 1))]
    masks = [(torch.rand(3, len(x), generator=torch.Generator().manual_seed(i)) > 0.5).float() for i, x in enumerate(xs)]
    gram, total, count = torch.zeros(3, d, d), torch.zeros(3, d), torch.zeros(3)
    for x, m in zip(xs, masks):
        F.add_moments_(gram, total, count, x, m, backend="torch")
    x, m = torch.cat(xs).double().numpy(), torch.cat(masks, dim=1).double().numpy()
    for j in range(3):
        rows = x[m[j] > 0]
        np.testing.assert_allclose(gram[j].numpy(), sum(np.outer(v, v) for v in rows), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(total[j].numpy(), rows.sum(0), rtol=1e-5, atol=1e-5)
        assert count[j] == len(rows)
    plain = (torch.zeros(d, d), torch.zeros(d), torch.zeros(()))
    for x_ in xs:
        F.add_moments_(*plain, x_, backend="torch")
    np.testing.assert_allclose(plain[0].numpy(), x.T @ x, rtol=1e-5, atol=1e-5)
    assert plain[2] == len(x)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_ema_blend_overwrites_keeps_and_blends(as_tensor):
    state = torch.tensor([[float("nan"), 1.0], [2.0, 3.0]])
    batch = torch.tensor([[5.0, 5.0], [float("nan"), 7.0]])
    rows = [(1.0, [5.0, 5.0]), (0.0, [2.0, 3.0])]  # row 0 overwritten (NaN gone), row 1 kept (NaN ignored)
    for (weight, expected), s, b in zip(rows, state, batch):
        w = torch.tensor(weight) if as_tensor else weight
        F.ema_(s, b, w)
        torch.testing.assert_close(s, torch.tensor(expected))
    blended = torch.tensor([1.0, 2.0])
    F.ema_(blended, torch.tensor([3.0, 6.0]), torch.tensor(0.25) if as_tensor else 0.25)
    torch.testing.assert_close(blended, torch.tensor([1.5, 3.0]))


def test_ema_weight_decides_on_the_device():
    assert F.ema_weight(0.3) == pytest.approx(0.7) and F.ema_weight(0.3, first=True) == 1.0
    w = F.ema_weight(0.3, first=torch.tensor([True, False, False]), fold=torch.tensor([True, True, False]))
    torch.testing.assert_close(w, torch.tensor([1.0, 0.7, 0.0]))


def test_corr_ema_skips_a_batch_not_folded_even_with_nan():
    corr, mean = torch.eye(3), torch.ones(3)
    x = torch.full((4, 3), float("nan"))
    F.corr_ema_(corr, x, 0.3, fold=torch.tensor(False), mean=mean)
    torch.testing.assert_close(corr, torch.eye(3))
    torch.testing.assert_close(mean, torch.ones(3))
    y = _data(6, 3)
    F.corr_ema_(corr, y, 0.3, first=torch.tensor(True), fold=torch.tensor(True))
    torch.testing.assert_close(corr, y.T @ y / 6)


# ------------------------------------------------------------------ batched functionals
def test_add_moments_with_leading_batch_dims_equals_a_loop_over_predictors():
    """x of shape (4, 64, 16) raised a broadcast error."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, 16, generator=g)
    gram, total, count = torch.zeros(4, 16, 16), torch.zeros(4, 16), torch.zeros(4)
    F.add_moments_(gram, total, count, x, backend="torch")
    for b in range(4):
        xb = x[b].double().numpy()
        np.testing.assert_allclose(gram[b].numpy(), xb.T @ xb, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(total[b].numpy(), xb.sum(0), rtol=1e-5, atol=1e-4)
        assert count[b].item() == 64


def test_add_moments_with_batch_dims_and_masks_equals_a_loop():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 20, 5, generator=g)
    masks = (torch.rand(3, 4, 20, generator=g) > 0.5).float()
    gram, total, count = torch.zeros(3, 4, 5, 5), torch.zeros(3, 4, 5), torch.zeros(3, 4)
    F.add_moments_(gram, total, count, x, masks, backend="torch")
    for b in range(3):
        for j in range(4):
            xs = x[b][masks[b, j] > 0].double().numpy()
            np.testing.assert_allclose(gram[b, j].numpy(), xs.T @ xs, rtol=1e-5, atol=1e-5)
            assert count[b, j].item() == len(xs)


def test_ema_weight_and_ema_with_per_predictor_first_and_fold_equal_a_loop():
    """ema_weight with first of shape (B,) was refused, naming the wrong argument."""
    rho = 0.3
    first = torch.tensor([True, False, False])
    fold = torch.tensor([True, True, False])
    weight = F.ema_weight(rho, first=first, fold=fold)
    assert weight.tolist() == pytest.approx([1.0, 0.7, 0.0])
    state, batch = torch.randn(3, 4, 4), torch.randn(3, 4, 4)
    out = F.ema_(state.clone(), batch, weight)
    for b, w in enumerate([1.0, 0.7, 0.0]):
        torch.testing.assert_close(out[b], state[b] + w * (batch[b] - state[b]))


def test_fold_moments_and_corr_ema_batched_equal_a_loop_over_predictors():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 32, 6, generator=g)
    first = torch.tensor([True, False, True])
    corr0 = torch.stack([torch.eye(6) * (b + 1) for b in range(3)])
    fused = corr0.clone()
    F.corr_ema_(fused, x, 0.4, first=first, backend="torch")
    gram, total, count = torch.zeros(3, 6, 6), torch.zeros(3, 6), torch.zeros(3)
    F.add_moments_(gram, total, count, x, backend="torch")
    folded = corr0.clone()
    F.fold_moments_(folded, gram, total, count, 0.4, first=first)
    for b in range(3):
        xb = x[b].double().numpy()
        batch = xb.T @ xb / 32
        expected = batch if first[b] else 0.4 * corr0[b].double().numpy() + 0.6 * batch
        np.testing.assert_allclose(fused[b].numpy(), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(folded[b].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_moments_under_fp16_autocast_stay_float32():
    x = torch.randn(8192, 64, generator=torch.Generator().manual_seed(3)) * 3 + 1
    gram, total, count = torch.zeros(64, 64), torch.zeros(64), torch.zeros(())
    corr = torch.zeros(64, 64)
    with torch.autocast("cpu", dtype=torch.float16):
        F.add_moments_(gram, total, count, x)
        F.corr_ema_(corr, x, 0.3, first=True)
    expected = x.double().T @ x.double()
    assert ((gram.double() - expected).abs().max() / expected.abs().max()).item() < 1e-6
    assert ((corr.double() - expected / 8192).abs().max() / (expected / 8192).abs().max()).item() < 1e-6


# ------------------------------------------------------------------ bad input, named
@pytest.mark.parametrize("rho", [2.0, -0.1, 1.0, float("nan"), "0.3"])
def test_corr_ema_refuses_rho_outside_the_unit_interval(rho):
    """rho=2 silently computed 2F - batch; rho=nan made F NaN."""
    corr = torch.eye(3)
    with pytest.raises(ValueError, match="rho must be"):
        F.corr_ema_(corr, torch.randn(4, 3), rho)
    assert torch.equal(corr, torch.eye(3))


def test_directpred_weight_of_a_vector_names_the_expected_shape():
    """randn(16) raised an IndexError that did not give the expected shape."""
    with pytest.raises(ValueError, match=r"corr must be .*\(\.\.\., d, d\)"):
        F.directpred_weight(torch.randn(16))


@pytest.mark.parametrize("call, match", [
    (lambda: F.corr_ema_(torch.zeros(3, 3), torch.randn(4, 5), 0.3), "x must have shape"),
    (lambda: F.corr_ema_(torch.zeros(3, 3, dtype=torch.float64), torch.randn(4, 3), 0.3), "corr must be a float32"),
    (lambda: F.add_moments_(torch.zeros(3, 3), torch.zeros(4), torch.zeros(()), torch.randn(2, 3)), "total must have"),
    (lambda: F.add_moments_(torch.zeros(2, 3, 3), torch.zeros(2, 3), torch.zeros(2), torch.randn(5, 3),
                            torch.ones(3, 5)), "masks must have shape"),
    (lambda: F.ema_(torch.zeros(2, 3), torch.zeros(3), torch.ones(4)), "weight"),
])
def test_functionals_name_the_argument_with_a_bad_shape(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
