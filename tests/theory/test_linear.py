"""The full linear dynamics (Eqs. 2-4) and the claims of §2: Theorems 1-2, SM Eq. 55, SM Fig. 7."""

import numpy as np
import pytest
from scipy.linalg import expm

from fastpred.theory import (LinearConfig, ema_tau, invariant_matrix, isotropic,
                             linear_field, normalized_correlation, simulate_decoupled,
                             simulate_linear)

N1, N2 = 5, 3


def random_problem(seed, n1=N1, n2=N2, scale=0.5):
    rng = np.random.default_rng(seed)
    A, B = rng.standard_normal((n1, n1)), rng.standard_normal((n1, n1))
    X, Xp = A @ A.T / n1 + 0.1 * np.eye(n1), 0.3 * B @ B.T / n1 + 0.15 * np.eye(n1)
    return (X, Xp, scale * rng.standard_normal((n2, n1)), scale * rng.standard_normal((n2, n2)),
            scale * rng.standard_normal((n2, n1)))


def loss(W, Wp, Wa, X, Xp):
    """Eq. 1 in closed form: views x_i = xbar + e_i, E[x1 x1^T] = X + X', E[x1 x2^T] = X."""
    S = X + Xp
    return 0.5 * (np.trace(Wp @ W @ S @ W.T @ Wp.T) - 2 * np.trace(Wp @ W @ X @ Wa.T)
                  + np.trace(Wa @ S @ Wa.T))


def num_grad(f, A, h=1e-6):
    g = np.zeros_like(A)
    for idx in np.ndindex(A.shape):
        E = np.zeros_like(A)
        E[idx] = h
        g[idx] = (f(A + E) - f(A - E)) / (2 * h)
    return g


@pytest.mark.parametrize("cfg", [
    LinearConfig(alpha_p=1.7, eta=0.03, target="ema", beta=0.5),
    LinearConfig(alpha_p=0.5, eta=0.0, target="online"),
    LinearConfig(eta=0.1, target="online", stop_grad=False),
    LinearConfig(eta=0.1, target="scaled", tau=0.6, stop_grad=False),
    LinearConfig(eta=0.02, target="online", predictor=False),
], ids=["byol", "simsiam", "simsiam-nostopgrad", "scaled-nostopgrad", "nopredictor"])
def test_field_is_minus_gradient_of_eq1(cfg):
    """Lemma 1 / SM Eq. 50: the flow is -grad J (stop-gradient: W_a held fixed) minus weight decay."""
    X, Xp, W, Wp, Wa = random_problem(0)
    if not cfg.predictor:
        Wp = np.eye(N2)
    dW, dWp, _ = linear_field(W, Wp, Wa, X, Xp, cfg)
    target = {"ema": lambda V: Wa, "online": lambda V: V, "scaled": lambda V: cfg.tau * V}[cfg.target]
    held = target(W)
    if cfg.stop_grad:
        gW = num_grad(lambda V: loss(V, Wp, held, X, Xp), W)
    else:
        gW = num_grad(lambda V: loss(V, Wp, target(V), X, Xp), W)
    np.testing.assert_allclose(dW, -gW - cfg.eta * W, atol=1e-8)
    if cfg.predictor:
        gWp = num_grad(lambda V: loss(W, V, held, X, Xp), Wp)
        np.testing.assert_allclose(dWp, -cfg.alpha_p * gWp - cfg.eta * Wp, atol=1e-8)


def test_nostopgrad_field_is_kronecker_form_of_theorem2():
    """SM Eq. 54: d vec(W)/dt = -[X' (x) (Wp^T Wp + I) + X (x) Wt^T Wt + eta I] vec(W)."""
    X, Xp, W, Wp, _ = random_problem(1)
    eta = 0.07
    dW, _, _ = linear_field(W, Wp, W, X, Xp, LinearConfig(eta=eta, target="online", stop_grad=False))
    Wt = Wp - np.eye(N2)
    H = np.kron(Xp, Wp.T @ Wp + np.eye(N2)) + np.kron(X, Wt.T @ Wt) + eta * np.eye(N1 * N2)
    np.testing.assert_allclose(dW.ravel(order="F"), -H @ W.ravel(order="F"), atol=1e-12)


@pytest.mark.parametrize("cfg", [
    LinearConfig(alpha_p=2.0, eta=0.05, target="ema", beta=0.5),
    LinearConfig(alpha_p=0.7, eta=0.0, target="online"),
    LinearConfig(alpha_p=1.0, eta=0.1, target="scaled", tau=0.6),
], ids=["byol-eta", "simsiam", "scaled"])
def test_theorem1_invariance(cfg):
    """Eq. 5: exp(2 eta t)(W W^T - Wp^T Wp / alpha_p) is constant whatever W_a does."""
    X, Xp, W0, Wp0, _ = random_problem(2)
    tr = simulate_linear(W0, X, Xp, cfg, Wp0=Wp0, t_end=50.0, dt=0.01, save_every=250)
    C = invariant_matrix(tr.W, tr.Wp, tr.t, alpha_p=cfg.alpha_p, eta=cfg.eta)
    # W W^T - Wp^T Wp / alpha_p - exp(-2 eta t) C(0), relative to the size of W W^T
    resid = np.exp(-2 * cfg.eta * tr.t)[:, None, None] * (C - C[0])
    drift = np.abs(resid).max() / np.abs(tr.W @ tr.W.mT).max()
    assert drift < 2e-6                                            # RK4 error, O(dt^4)
    assert np.abs(tr.W[-1] - W0).max() > 0.1                       # W really moved
    coarse = simulate_linear(W0, X, Xp, cfg, Wp0=Wp0, t_end=50.0, dt=0.02, save_every=125)
    Cc = invariant_matrix(coarse.W, coarse.Wp, coarse.t, alpha_p=cfg.alpha_p, eta=cfg.eta)
    drift_c = (np.abs(np.exp(-2 * cfg.eta * coarse.t)[:, None, None] * (Cc - Cc[0])).max()
               / np.abs(coarse.W @ coarse.W.mT).max())
    assert drift_c > 8 * drift                                     # drift is integration error
    # Negative control: SM Eq. 41 as printed (no alpha_p^{-1}) is not conserved for alpha_p != 1.
    if cfg.alpha_p != 1.0:
        C41 = invariant_matrix(tr.W, tr.Wp, tr.t, alpha_p=1.0, eta=cfg.eta)
        resid41 = np.exp(-2 * cfg.eta * tr.t)[:, None, None] * (C41 - C41[0])
        assert np.abs(resid41).max() / np.abs(tr.W @ tr.W.mT).max() > 1e-2


@pytest.mark.parametrize("cfg", [
    LinearConfig(alpha_p=2.0, eta=0.05, target="ema", beta=0.5),
    LinearConfig(alpha_p=0.7, eta=0.3, target="online"),
    LinearConfig(alpha_p=3.0, eta=0.1, target="scaled", tau=0.6),
], ids=["byol", "simsiam", "scaled"])
def test_theorem1_invariant_has_zero_derivative(cfg):
    """SM Eq. 44 at random states: d/dt[exp(2 eta t)(W W^T - Wp^T Wp / alpha_p)] = 0 to rounding."""
    for seed in range(5):
        X, Xp, W, Wp, Wa = random_problem(10 + seed, scale=1.0)
        dW, dWp, _ = linear_field(W, Wp, Wa, X, Xp, cfg)
        lhs = dW @ W.T + W @ dW.T + 2 * cfg.eta * W @ W.T
        rhs = (Wp.T @ dWp + dWp.T @ Wp + 2 * cfg.eta * Wp.T @ Wp) / cfg.alpha_p
        np.testing.assert_allclose(lhs, rhs, atol=1e-12)
        assert np.abs(lhs).max() > 1e-2


def test_theorem1_needs_stop_gradient():
    X, Xp, W0, Wp0, _ = random_problem(3)
    cfg = LinearConfig(eta=0.0, target="online", stop_grad=False)
    tr = simulate_linear(W0, X, Xp, cfg, Wp0=Wp0, t_end=5.0, dt=0.01, save_every=100)
    C = invariant_matrix(tr.W, tr.Wp, tr.t)
    assert np.abs(C - C[0]).max() > 1e-2


@pytest.mark.parametrize("eta", [0.0, 0.05])
def test_theorem2_collapse_without_stop_gradient(eta):
    """Thm 2: ||W(t)|| <= exp(-(lambda_min(X') + eta) t) ||W(0)||; with stop-grad it does not collapse."""
    X, Xp, W0, Wp0, _ = random_problem(4, scale=1.0)
    lam0 = np.linalg.eigvalsh(Xp)[0] + eta
    cfg = LinearConfig(eta=eta, target="online", stop_grad=False)
    tr = simulate_linear(W0, X, Xp, cfg, Wp0=Wp0, t_end=50.0, dt=0.04, save_every=25)
    norms = np.linalg.norm(tr.W, axis=(1, 2))
    assert np.all(norms <= np.exp(-lam0 * tr.t) * norms[0] * (1 + 1e-9))
    assert norms[-1] < 1e-3 * norms[0]
    kept = simulate_linear(W0, X, Xp, LinearConfig(eta=eta, target="online"), Wp0=Wp0,
                           t_end=50.0, dt=0.04, save_every=1250)
    assert np.linalg.norm(kept.W[-1]) > 0.3 * norms[0]


@pytest.mark.parametrize("eta", [0.0, 0.1])
def test_no_predictor_collapses_in_closed_form(eta):
    """SM Eq. 55 (SimSiam, stop-grad, W_p = I): W(t) = W(0) expm(-(X' + eta I) t) -> 0."""
    X, Xp, W0, _, _ = random_problem(5)
    cfg = LinearConfig(eta=eta, target="online", predictor=False)
    tr = simulate_linear(W0, X, Xp, cfg, t_end=50.0, dt=0.05, save_every=200)
    for t, W in zip(tr.t, tr.W):
        np.testing.assert_allclose(W, W0 @ expm(-(Xp + eta * np.eye(N1)) * t), atol=1e-10)
    assert np.linalg.norm(tr.W[-1]) < 1e-3 * np.linalg.norm(W0)
    np.testing.assert_array_equal(tr.Wp[-1], np.eye(N2))


@pytest.mark.parametrize("eta", [0.0, 0.1])
def test_fig7_ema_target_stays_proportional(eta):
    """SM Fig. 7: with X = I, X' = 0.03^2 I, gamma_a = 0.996 (beta = 0.4 at lr 0.01) and
    W_a(0) = 0, the normalized correlation of W_a and W stays >= 0.9 (10 runs), and tau -> 1."""
    rng = np.random.default_rng(6)
    n, runs = 6, 10
    model = isotropic(n, 0.03**2)
    W0 = rng.standard_normal((runs, n, n)) / np.sqrt(n)
    Wp0 = rng.standard_normal((runs, n, n)) / np.sqrt(n)
    cfg = LinearConfig(eta=eta, target="ema", beta=0.4)
    tr = simulate_linear(W0, model.X, model.X_prime, cfg, Wp0=Wp0, t_end=30.0, dt=0.02,
                         save_every=10)
    late = tr.t >= 1.0
    corr = normalized_correlation(tr.W[late], tr.Wa[late])
    assert corr.min() >= 0.9
    np.testing.assert_allclose(ema_tau(tr.W[-1], tr.Wa[-1]), 1.0, atol=0.02)


def test_scalar_byol_is_decoupled_mode():
    """§3.1: Eqs. 11-13 are Eqs. 2-4 at n1 = n2 = 1 with s = W^2, p = W_p, tau = W_a / W."""
    sigma2, eta, alpha_p, beta = 0.2, 0.03, 1.5, 0.4
    w0, p0, tau0 = np.array([0.3, 0.8, 1.2]), np.array([0.4, 0.1, 0.9]), 0.2
    model = isotropic(1, sigma2)
    cfg = LinearConfig(alpha_p=alpha_p, eta=eta, target="ema", beta=beta)
    tr = simulate_linear(w0[:, None, None], model.X, model.X_prime, cfg, Wp0=p0[:, None, None],
                         Wa0=tau0 * w0[:, None, None], t_end=20.0, dt=0.01, save_every=100)
    t, p, s, tau = simulate_decoupled(p0, w0**2, tau=tau0, alpha_p=alpha_p, beta=beta, eta=eta,
                                      sigma2=sigma2, t_end=20.0, dt=0.01, save_every=100)
    np.testing.assert_allclose(p, tr.Wp[..., 0, 0], atol=1e-9)
    np.testing.assert_allclose(s, tr.W[..., 0, 0] ** 2, atol=1e-9)
    np.testing.assert_allclose(tau, tr.Wa[..., 0, 0] / tr.W[..., 0, 0], atol=1e-9)
    assert np.abs(p[-1] - p0).max() > 0.1


def test_aligned_full_dynamics_decouple_into_modes():
    """§3.1: a diagonal (aligned) start under Assumption 2 stays diagonal and each mode follows Eqs. 11-13."""
    sigma2, eta, beta = 0.1, 0.01, 0.5
    w0, p0 = np.array([0.5, 0.2, 0.05, 0.9]), np.array([0.3, 0.6, 0.02, 0.5])
    model = isotropic(4, sigma2)
    tr = simulate_linear(np.diag(w0), model.X, model.X_prime,
                         LinearConfig(eta=eta, target="ema", beta=beta), Wp0=np.diag(p0),
                         Wa0=0.5 * np.diag(w0), t_end=15.0, dt=0.01, save_every=150)
    _, p, s, tau = simulate_decoupled(p0, w0**2, tau=0.5, beta=beta, eta=eta, sigma2=sigma2,
                                      t_end=15.0, dt=0.01, save_every=150)
    off = tr.W - np.einsum("tii->ti", tr.W)[:, :, None] * np.eye(4)
    assert np.abs(off).max() == 0.0
    np.testing.assert_allclose(np.einsum("tii->ti", tr.Wp), p, atol=1e-9)
    np.testing.assert_allclose(np.einsum("tii->ti", tr.W) ** 2, s, atol=1e-9)
    np.testing.assert_allclose(np.einsum("tii->ti", tr.Wa) / np.einsum("tii->ti", tr.W), tau, atol=1e-9)


def test_config_rejects_bad_combinations():
    with pytest.raises(ValueError, match="beta"):
        LinearConfig(target="ema")
    with pytest.raises(ValueError, match="stop_grad"):
        LinearConfig(target="ema", beta=1.0, stop_grad=False)
    with pytest.raises(ValueError, match="target"):
        LinearConfig(target="momentum")
    X, Xp, W0, Wp0, _ = random_problem(7)
    with pytest.raises(ValueError, match="symmetric"):
        simulate_linear(W0, X, Xp, LinearConfig(target="online", symmetric_predictor=True),
                        Wp0=Wp0, t_end=1.0, dt=0.1)
    with pytest.raises(ValueError, match="Wp0"):
        simulate_linear(W0, X, Xp, LinearConfig(target="online"), t_end=1.0, dt=0.1)
