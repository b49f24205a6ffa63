"""fastpred.losses against independent float64 references of the published formulas.

IsoLoss reference: the loss of Halvagal, Laborieux & Zenke (NeurIPS 2023) written out term by
term with W_p and W_p^(1/2) built from a float64 eigendecomposition of F (their eigenvalue map:
s~ = max(s, 0) / max s + eps, W_p = U diag(s~^alpha) U^T, W_p^(1/2) = U diag(s~^(alpha/2)) U^T),
differentiated by autograd; and, independently of autograd, by central differences in NumPy of the
same surrogate with its stop-gradient factors frozen (a quadratic in z, so the differences are
exact up to rounding).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastpred
from fastpred.losses import FORMS, byol_loss, isoloss

TOL = 1e-10


# ----------------------------------------------------------------------------- references


def published_maps(corr: np.ndarray, alpha: float, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(W_p, W_p^(1/2)) from one float64 eigh of F, with the published eigenvalue map."""
    s, u = np.linalg.eigh(corr)
    s = np.clip(s, 0, None) / s.max() + eps
    return (u * s**alpha) @ u.T, (u * s ** (alpha / 2)) @ u.T


def published_isoloss(z, p, psqrt, zt, form):
    """The published loss in float64 torch, term by term (sg = detach)."""
    zt = zt.detach()
    if form == "cosine":
        pn, tn = p.norm(dim=1), zt.norm(dim=1)
        first = (z * zt).sum(1) / (pn * tn).detach()
        c = ((p * zt).sum(1) / (pn**3 * tn)).detach()
        return -2 * (first - 0.5 * c * psqrt.norm(dim=1) ** 2).mean()
    return ((z - (zt + z - p).detach()) ** 2).sum(1).mean()


def published_grad_autograd(z, zt, wp, wsqrt, form) -> np.ndarray:
    z = torch.tensor(z, requires_grad=True)
    wp, wsqrt, zt = (torch.tensor(a) for a in (wp, wsqrt, zt))
    loss = published_isoloss(z, z @ wp, z @ wsqrt, zt, form)
    loss.backward()
    return z.grad.numpy()


def published_grad_numpy(z, zt, wp, wsqrt, form, h=1.0) -> np.ndarray:
    """Central differences of the published surrogate with its sg factors frozen at z."""
    p = z @ wp
    if form == "cosine":
        pn, tn = np.linalg.norm(p, axis=1), np.linalg.norm(zt, axis=1)
        inv, c = 1 / (pn * tn), (p * zt).sum(1) / (pn**3 * tn)

        def f(y):
            return -2 * np.mean((y * zt).sum(1) * inv - 0.5 * c * ((y @ wsqrt) ** 2).sum(1))
    else:
        frozen = zt + z - p

        def f(y):
            return np.mean(((y - frozen) ** 2).sum(1))

    g = np.zeros_like(z)
    for idx in np.ndindex(*z.shape):
        e = np.zeros_like(z)
        e[idx] = h
        g[idx] = (f(z + e) - f(z - e)) / (2 * h)
    return g


def fastpred_grad(z, zt, wp, form) -> np.ndarray:
    z = torch.tensor(z, requires_grad=True)
    isoloss(z, z @ torch.tensor(wp), torch.tensor(zt), form).backward()
    return z.grad.numpy()


def random_corr(rng, d: int, kind: str) -> np.ndarray:
    if kind == "full":
        a = rng.standard_normal((d, 3 * d))
        return a @ a.T / (3 * d)
    # near-singular: rank d/4 plus a 1e-12 floor, eigenvalues spread over 12 decades
    a = rng.standard_normal((d, d // 4)) * np.logspace(0, -3, d // 4)
    return a @ a.T + 1e-12 * np.eye(d)


CASES = [(kind, form, alpha, eps) for kind in ("full", "near_singular") for form in FORMS
         for alpha, eps in ((0.5, 0.0), (0.5, 0.1), (1.0, 0.25))]


# ----------------------------------------------------------------------------- IsoLoss gradients


@pytest.mark.parametrize("kind, form, alpha, eps", CASES, ids=[f"{k}-{f}-a{a}-eps{e}" for k, f, a, e in CASES])
def test_isoloss_gradient_equals_published_formula(kind, form, alpha, eps):
    rng = np.random.default_rng(CASES.index((kind, form, alpha, eps)))
    n, d = 12, 16
    corr = random_corr(rng, d, kind)
    wp, wsqrt = published_maps(corr, alpha, eps)
    assert np.abs(wsqrt @ wsqrt - wp).max() < 1e-12  # the reference's square root is one
    z, zt = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    ref = published_grad_autograd(z, zt, wp, wsqrt, form)
    ref_np = published_grad_numpy(z, zt, wp, wsqrt, form)
    ours = fastpred_grad(z, zt, wp, form)
    assert np.abs(ref - ref_np).max() < TOL  # the two references agree
    assert np.abs(ours - ref).max() < TOL * max(1.0, np.abs(ref).max())
    assert np.abs(ref).max() > 1e-3  # a gradient worth comparing


def test_backprop_through_the_predictor_is_not_isoloss():
    """The comparison can fail: BYOL's gradient (through W_p^T) differs from IsoLoss's."""
    rng = np.random.default_rng(1)
    wp, wsqrt = published_maps(random_corr(rng, 16, "full"), 0.5, 0.0)
    z, zt = rng.standard_normal((12, 16)), rng.standard_normal((12, 16))
    zz = torch.tensor(z, requires_grad=True)
    byol_loss(zz @ torch.tensor(wp), torch.tensor(zt)).backward()
    ref = published_grad_autograd(z, zt, wp, wsqrt, "cosine")
    assert np.abs(zz.grad.numpy() - ref).max() > 1e3 * TOL


@pytest.mark.parametrize("power, eps", [(0.5, 0.0), (0.5, 0.1), (1.0, 0.25)])
def test_isoloss_with_a_direct_predictor_per_view_and_concatenated(power, eps):
    """p from fastpred.DirectPredictor (its own W_p), per-view calls or one concatenated call:
    gradients as the published formula with W_p^(1/2) the float64 square root of that W_p."""
    torch.manual_seed(0)
    d, n = 16, 10
    pred = fastpred.DirectPredictor(d, rho=0.5, eps=eps, power=power).double()
    for _ in range(3):  # F and W_p from a few batches
        pred(torch.randn(40, d, dtype=torch.float64) * torch.linspace(0.05, 2, d, dtype=torch.float64))
    pred.eval()
    wp = pred.weight.detach().numpy()
    s, u = np.linalg.eigh((wp + wp.T) / 2)
    assert np.abs(wp - wp.T).max() < 1e-12 and s.min() > 0
    wsqrt = (u * np.sqrt(s)) @ u.T
    z1, z2, t1, t2 = (torch.randn(n, d, dtype=torch.float64) for _ in range(4))
    ref = [published_grad_autograd(z.numpy(), t.numpy(), wp, wsqrt, "cosine") for z, t in ((z1, t2), (z2, t1))]

    a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    (isoloss(a1, pred(a1), t2) + isoloss(a2, pred(a2), t1)).backward()  # per view
    b1, b2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    q1, q2 = pred(torch.cat([b1, b2])).chunk(2)  # one call
    (isoloss(b1, q1, t2) + isoloss(b2, q2, t1)).backward()
    for got in ((a1.grad, a2.grad), (b1.grad, b2.grad)):
        for g, r in zip(got, ref):
            assert np.abs(g.numpy() - r).max() < TOL


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_isoloss_with_partitions_uses_each_samples_own_w(training):
    """Partitions (Sec. 4): sample i is predicted by its own W_i, the mean of the half-space
    predictors it falls in. IsoLoss's gradient for z_i is the published formula with that W_i and
    W_i^(1/2) (float64 square root), W_i read off the predictor's Jacobian at z_i."""
    torch.manual_seed(1)
    d, n, k = 12, 10, 3
    pred = fastpred.DirectPredictor(d, rho=0.5, eps=0.1, partitions=k).double()
    for _ in range(3):  # F per half-space and the thresholds from a few batches
        pred(torch.randn(64, d, dtype=torch.float64) * torch.linspace(0.1, 2, d, dtype=torch.float64))
    pred.train(training)
    z, t = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    if training:  # a training call folds its batch when not attached: freeze the state it predicts with
        pred.attach()
    jac = torch.autograd.functional.jacobian(lambda x: pred(x), z)  # (n, d, n, d): p_i = W_i z_i
    ws = [jac[i, :, i, :].T.numpy() for i in range(n)]  # row convention: p_i = z_i @ W_i
    off_diagonal = jac.clone()
    off_diagonal[range(n), :, range(n), :] = 0
    assert off_diagonal.abs().max().item() == 0  # the threshold split is not differentiated
    assert len({w.round(decimals=12).tobytes() for w in ws}) > 1  # the samples use different W_i
    zz = z.clone().requires_grad_()
    isoloss(zz, pred(zz), t).backward()
    for i, w in enumerate(ws):
        s, u = np.linalg.eigh((w + w.T) / 2)
        assert np.abs(w - w.T).max() < 1e-12 and s.min() > 0
        wsqrt = (u * np.sqrt(s)) @ u.T
        ref = published_grad_autograd(z.numpy(), t.numpy(), w, wsqrt, "cosine")[i]  # rows are independent
        assert np.abs(zz.grad[i].numpy() - ref).max() < TOL


# ----------------------------------------------------------------------------- values and graph


def _cos_np(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_values_are_the_byol_loss_of_p():
    rng = np.random.default_rng(2)
    z, p, t = (rng.standard_normal((9, 7)) for _ in range(3))
    zz, pp, tt = (torch.tensor(a) for a in (z, p, t))
    cos_ref = np.mean(2 - 2 * _cos_np(p, t))
    l2_ref = np.mean(((p - t) ** 2).sum(1))
    assert abs(byol_loss(pp, tt).item() - cos_ref) < 1e-6  # float32
    assert abs(byol_loss(pp, tt, "euclidean").item() - l2_ref) < 1e-5 * l2_ref
    assert isoloss(zz, pp, tt).item() == byol_loss(pp, tt).item()
    assert isoloss(zz, pp, tt, "euclidean").item() == byol_loss(pp, tt, "euclidean").item()
    # the Euclidean value is also the published loss's value
    published = published_isoloss(zz, pp, None, tt, "euclidean").item()
    assert abs(isoloss(zz, pp, tt, "euclidean").item() - published) < 1e-5 * published


def test_gradient_reaches_z_only():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 6, bias=False)  # stands for any predictor with a trainable map
    z = torch.randn(5, 6, requires_grad=True)
    t = torch.randn(5, 6, requires_grad=True)
    isoloss(z, lin(z), t).backward()
    assert lin.weight.grad is None and t.grad is None
    assert z.grad is not None and z.grad.abs().max() > 0


def test_byol_loss_keeps_an_attached_target():
    """The no-stop-gradient ablation passes the target attached: the gradient must reach it."""
    p, t = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    byol_loss(p, t).backward()
    assert t.grad is not None and t.grad.abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", FORMS)
def test_under_autocast_the_loss_is_float32(dtype, form):
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8, bias=False)
    x, t = torch.randn(32, 8), torch.randn(32, 8)
    grads = {}
    for amp in (False, True):
        z = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=amp):
            zin = z * 1.0
            p = lin(zin)  # bf16/fp16 under autocast
            loss = isoloss(zin, p, t.to(p.dtype), form)
        assert loss.dtype == torch.float32
        loss.backward()
        grads[amp] = z.grad
    # only p and t were rounded to the low precision: the gradient stays close to float32's
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    assert (grads[True] - grads[False]).abs().max() <= tol * grads[False].abs().max()


def test_compiles():
    torch.manual_seed(0)
    f = torch.compile(lambda z, p, t: isoloss(z, p, t), fullgraph=True)  # inductor
    z = torch.randn(6, 4, requires_grad=True)
    p, t = torch.randn(6, 4), torch.randn(6, 4)
    f(z, p, t).backward()
    ref = z.detach().clone().requires_grad_()
    isoloss(ref, p, t).backward()
    assert torch.allclose(z.grad, ref.grad)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call, err, needle", [
    (lambda: isoloss(torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4), "l1"), ValueError, "form"),
    (lambda: byol_loss(torch.randn(3, 4), torch.randn(3, 4), "cos"), ValueError, "form"),
    (lambda: isoloss(torch.randn(3, 4), torch.randn(3, 5), torch.randn(3, 4)), ValueError, "same shape"),
    (lambda: isoloss(torch.randn(3, 4), torch.randn(3, 4), torch.randn(4)), ValueError, "z_target"),
    (lambda: byol_loss(torch.ones(3, 4, dtype=torch.int64), torch.randn(3, 4)), TypeError, "p must"),
    (lambda: isoloss([1.0], torch.randn(3, 4), torch.randn(3, 4)), TypeError, "z must"),
])
def test_bad_input_names_the_argument(call, err, needle):
    with pytest.raises(err, match=needle):
        call()


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("which", ["byol", "isoloss"])
def test_an_empty_batch_is_a_zero_loss_whose_backward_gives_zero_gradients(which, form):
    # issue 25: NaN for N = 0, which a DDP all-reduce would spread to every rank's gradients
    torch.manual_seed(0)
    online = torch.nn.Linear(4, 4)
    z = online(torch.zeros(0, 4))
    target = torch.zeros(0, 4)
    loss = byol_loss(z, target, form) if which == "byol" else isoloss(z, z * 2, target, form)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(online.weight.grad, torch.zeros(4, 4)) and torch.equal(online.bias.grad, torch.zeros(4))
