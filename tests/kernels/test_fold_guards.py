"""The guards of a step, fused: ``fold_`` (the fold of a step's moments into F, judged by
them; Eq. 19) and ``install_`` (a rebuilt W_p installed only when finite), on every
backend that runs here (the torch reference, the extension's CPU op, the Triton kernels
through the interpreter), each held against the reference and against an independent
float64 NumPy model of the rule written from the text of issue 25 / docs/design.md."""
import numpy as np
import pytest
import torch

from fastpred import backends, functional
from fastpred.backends import reference



def available(name):
    try:
        backends.resolve(name, "cpu")
    except RuntimeError:
        return False
    return True


BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(not available(name), reason=f"{name} does not run here"))
            for name in ("torch", "csrc", "triton")]


def numpy_fold(corr, gram, total, count, first, rho, mean):
    """The rule in float64: the step is usable when every moment is finite; per F the weight
    is 1 (first), 1 - rho, or 0 (unusable step, or no sample); F <- (1 - w) F + w G / n."""
    corr, mean = corr.astype(np.float64).copy(), None if mean is None else mean.astype(np.float64).copy()
    usable = all(np.isfinite(a).all() for a in (gram, total, count))
    weights = []
    for b in np.ndindex(count.shape):
        w = (1.0 if first[b] else 1.0 - rho) if usable and count[b] > 0 else 0.0
        weights.append(w)
        if w == 0.0:
            continue
        n = float(count[b])
        corr[b] = gram[b] / n if w == 1.0 else (1 - w) * corr[b] + w * gram[b] / n
        if mean is not None:
            mean[b] = total[b] / n if w == 1.0 else (1 - w) * mean[b] + w * total[b] / n
    return corr, mean, np.array(weights).reshape(count.shape), usable


def moments(stack, d, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*stack, n, d, generator=g) * 2 + 0.5
    gram, total = x.mT @ x, x.sum(-2)
    count = torch.full(stack, float(n))
    return gram.contiguous(), total.contiguous(), count


CASES = [((), 7, False, [False], [24]), ((), 40, True, [True], [24]), ((4,), 7, True, [True, False, False, True], [24, 0, 5, 3]),
         ((3,), 33, False, [False, False, True], [24, 24, 0]), ((), 1, True, [False], [2])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stack,d,with_mean,first,count", CASES, ids=lambda v: str(v))
def test_fold_matches_reference_and_numpy(backend, stack, d, with_mean, first, count):
    gram, total, _ = moments(stack, d)
    count = torch.tensor(count, dtype=torch.float32).reshape(stack)
    first = torch.tensor(first).reshape(stack)
    g = torch.Generator().manual_seed(1)
    corr0 = torch.randn(*stack, d, d, generator=g)
    corr0 = corr0 @ corr0.mT
    mean0 = torch.randn(*stack, d, generator=g) if with_mean else None
    corr, mean = corr0.clone(), None if mean0 is None else mean0.clone()
    weight, usable = functional.fold_moments_(corr, gram, total, count, 0.3, first=first, mean=mean, backend=backend)
    expected = numpy_fold(corr0.numpy(), gram.numpy(), total.numpy(), count.numpy(), first.numpy(), 0.3,
                          None if mean0 is None else mean0.numpy())
    np.testing.assert_allclose(corr.numpy(), expected[0], rtol=1e-5, atol=1e-5)
    if mean is not None:
        np.testing.assert_allclose(mean.numpy(), expected[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(weight.numpy(), expected[2], rtol=1e-6)
    assert weight.dtype == torch.float32 and usable.dtype == torch.bool and bool(usable) == expected[3]
    # ...and the same as the reference (the spec), within float32 rounding.
    corr_r, mean_r = corr0.clone(), None if mean0 is None else mean0.clone()
    weight_r, usable_r = reference.fold_(corr_r, gram, total, count, first, 0.3, mean_r)
    torch.testing.assert_close(corr, corr_r, rtol=1e-6, atol=1e-6)
    assert torch.equal(weight, weight_r) and torch.equal(usable, usable_r)
    kept = torch.as_tensor(np.asarray(expected[2] == 0)).reshape(stack)
    assert torch.equal(corr[kept], corr0[kept])  # a kept F is kept bitwise


SPOILERS = {
    "nan in gram": lambda g, t, c: g.view(-1).__setitem__(5, float("nan")),
    "inf in gram (overflow)": lambda g, t, c: g.view(-1).__setitem__(-1, float("inf")),
    "-inf in total": lambda g, t, c: t.view(-1).__setitem__(0, float("-inf")),
    "nan count": lambda g, t, c: c.view(-1).__setitem__(0, float("nan")),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spoil", SPOILERS, ids=str)
@pytest.mark.parametrize("stack", [(), (2,)], ids=str)
def test_unusable_step_writes_nothing(backend, spoil, stack):
    d = 40  # more than one Triton block
    gram, total, count = moments(stack, d)
    SPOILERS[spoil](gram, total, count)
    corr0 = torch.full((*stack, d, d), 0.25)
    corr0.view(-1)[3] = float("nan")  # even a first fold (which would overwrite it) is skipped
    mean0 = torch.arange(float(np.prod(stack) * d)).reshape(*stack, d)
    corr, mean = corr0.clone(), mean0.clone()
    first = torch.ones(stack, dtype=torch.bool)
    weight, usable = functional.fold_moments_(corr, gram, total, count, 0.3, first=first, mean=mean, backend=backend)
    assert not bool(usable) and torch.equal(weight, torch.zeros(stack))
    assert torch.equal(corr.isnan(), corr0.isnan()) and torch.equal(corr.nan_to_num(), corr0.nan_to_num())
    assert torch.equal(mean, mean0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_fold_overwrites_garbage(backend):
    d = 9
    gram, total, count = moments((), d)
    corr = torch.full((d, d), float("nan"))
    weight, usable = functional.fold_moments_(corr, gram, total, count, 0.3, first=True, backend=backend)
    assert bool(usable) and float(weight) == 1.0
    np.testing.assert_allclose(corr.numpy(), gram.double().numpy() / 24, rtol=1e-6)


def numpy_install(weight, new):
    return (new.copy(), True) if np.isfinite(new).all() else (weight.copy(), False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), float("-inf")], ids=str)
@pytest.mark.parametrize("shape", [(7, 7), (4, 33, 33)], ids=str)
def test_install_weight_matches_numpy(backend, bad, shape):
    g = torch.Generator().manual_seed(3)
    weight0, new = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    if bad is not None:
        new.view(-1)[-2] = bad
    weight = weight0.clone()
    ok = functional.install_weight_(weight, new, backend=backend)
    expected, expected_ok = numpy_install(weight0.numpy(), new.numpy())
    assert ok.dtype == torch.bool and ok.dim() == 0 and bool(ok) == expected_ok
    assert np.array_equal(weight.numpy(), expected)  # a copy or nothing: bitwise


@pytest.mark.parametrize("backend", BACKENDS)
def test_install_weight_casts_to_the_weight_dtype(backend):
    weight = torch.zeros(5, 5, dtype=torch.float16)
    new = torch.randn(5, 5)
    assert bool(functional.install_weight_(weight, new, backend=backend))
    assert torch.equal(weight, new.half())


def test_fold_and_install_refuse_bad_arguments_by_name():
    d = 4
    corr, gram, total, count = torch.zeros(d, d), torch.zeros(d, d), torch.zeros(d), torch.ones(())
    with pytest.raises(ValueError, match="first"):
        functional.fold_moments_(corr, gram, total, count, 0.3, first=torch.tensor([1, 0]))
    with pytest.raises(TypeError, match="total"):
        functional.fold_moments_(corr, gram, total.double(), count, 0.3)
    with pytest.raises(ValueError, match="rho"):
        functional.fold_moments_(corr, gram, total, count, 1.0)
    with pytest.raises(ValueError, match="new"):
        functional.install_weight_(corr, torch.zeros(d + 1, d + 1))
    with pytest.raises(TypeError, match="weight"):
        functional.install_weight_(corr.long(), corr)
