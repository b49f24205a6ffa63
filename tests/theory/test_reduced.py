"""W_p / F dynamics (Eq. 7, SM Eqs. 60-61), Theorem 3 and SM B's fixed-point analysis."""

import numpy as np
import pytest

from fastpred.theory import (K_matrix, LinearConfig, commutator, fixed_points, isotropic,
                             reduced_field, simulate_decoupled, simulate_linear,
                             simulate_reduced)


def sym(rng, d, scale):
    A = rng.standard_normal((d, d))
    return scale * (A + A.T) / np.sqrt(2 * d)


def psd(rng, d, scale):
    A = rng.standard_normal((d, d))
    return scale * A @ A.T / d


@pytest.mark.parametrize("symmetric", [True, False])
def test_reduced_equals_full_dynamics_under_assumptions(symmetric):
    """SM Eqs. 56-61 / 65: with X = I, X' = sigma2 I, W_a = tau W, (W_p, W W^T) follow Eq. 7 (or 60-61)."""
    rng = np.random.default_rng(0)
    n2, n1, sigma2, tau, eta, alpha_p = 3, 5, 0.3, 0.7, 0.02, 1.5
    W0 = 0.6 * rng.standard_normal((n2, n1))
    Wp0 = sym(rng, n2, 0.8) if symmetric else 0.5 * rng.standard_normal((n2, n2))
    model = isotropic(n1, sigma2)
    cfg = LinearConfig(alpha_p=alpha_p, eta=eta, target="scaled", tau=tau,
                       symmetric_predictor=symmetric)
    full = simulate_linear(W0, model.X, model.X_prime, cfg, Wp0=Wp0, t_end=20.0, dt=0.01,
                           save_every=200)
    red = simulate_reduced(Wp0, W0 @ W0.T, tau=tau, alpha_p=alpha_p, eta=eta, sigma2=sigma2,
                           symmetric=symmetric, t_end=20.0, dt=0.01, save_every=200)
    np.testing.assert_allclose(red.Wp, full.Wp, atol=1e-7)   # RK4 error in two coordinate systems
    np.testing.assert_allclose(red.F, full.W @ full.W.mT, atol=1e-7)
    assert np.abs(red.Wp[-1] - Wp0).max() > 0.1


def test_theorem3_commutator_identity():
    """Eq. 8 at random states: d[F, W_p]/dt = -([F, W_p] K + K [F, W_p]) with K of Eq. 9."""
    rng = np.random.default_rng(1)
    for _ in range(5):
        d = 4
        Wp, F = sym(rng, d, 1.0), psd(rng, d, 1.0)
        kw = dict(alpha_p=rng.uniform(0.5, 3), eta=rng.uniform(0, 0.3), sigma2=rng.uniform(0, 1))
        tau = rng.uniform(0.1, 1.0)
        dWp, dF = reduced_field(Wp, F, tau, **kw)
        dL = dF @ Wp + F @ dWp - dWp @ F - Wp @ dF
        L, K = commutator(F, Wp), K_matrix(F, Wp, tau, **kw)
        np.testing.assert_allclose(dL, -(L @ K + K @ L), atol=1e-12)
        assert np.abs(dL).max() > 1e-3


def test_theorem3_commutator_decays_when_K_positive():
    """Eq. 10: ||[F, W_p](t)|| <= exp(-2 int_0^t lambda_min K) ||[F, W_p](0)|| <= exp(-2 lambda_0 t) ||.||."""
    rng = np.random.default_rng(2)
    d, tau, eta = 5, 0.5, 0.2
    Wp0, F0 = sym(rng, d, 0.25), psd(rng, d, 0.1)
    tr = simulate_reduced(Wp0, F0, tau=tau, eta=eta, t_end=40.0, dt=0.01, save_every=10)
    L = np.linalg.norm(commutator(tr.F, tr.Wp), axis=(1, 2))
    lam = np.linalg.eigvalsh(K_matrix(tr.F, tr.Wp, tau, eta=eta))[:, 0]
    assert lam.min() > 0                                        # the theorem's hypothesis
    integral = np.concatenate([[0.0], np.cumsum(0.5 * (lam[1:] + lam[:-1]) * np.diff(tr.t))])
    assert np.all(L <= np.exp(-2 * integral) * L[0] * (1 + 1e-6))
    assert np.all(L <= np.exp(-2 * lam.min() * tr.t) * L[0] * (1 + 1e-6))
    assert L[-1] < 1e-6 * L[0]


def test_commutator_grows_while_K_is_indefinite():
    """SM B.1 remark / Fig. 9: from near alignment with K not PD (eta = 0, tau = 1), [F, W_p] grows."""
    rng = np.random.default_rng(3)
    d = 6
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    Wp0 = Q * np.linspace(0.05, 0.5, d) @ Q.T + sym(rng, d, 1e-4)
    F0 = Q * np.linspace(2e-4, 2e-3, d) @ Q.T
    tr = simulate_reduced(Wp0, F0, tau=1.0, eta=0.0, t_end=30.0, dt=0.02, save_every=25)
    L = np.linalg.norm(commutator(tr.F, tr.Wp), axis=(1, 2))
    lam = np.linalg.eigvalsh(K_matrix(tr.F, tr.Wp, 1.0))[:, 0]
    assert lam[0] < 0
    assert L.max() > 10 * L[0]
    # ...and the growth stops once K has turned positive definite (the trained modes settle).
    assert L[-1] < L.max()


@pytest.mark.parametrize("tau,eta,sigma2,alpha_p", [(1.0, 0.01, 0.2, 1.0), (0.8, 0.05, 0.0, 2.0)])
def test_asymmetric_predictor_reaches_symmetric_fixed_point(tau, eta, sigma2, alpha_p):
    """SM Eqs. 62-64 and Fig. 8: from F = W_p^T W_p / alpha_p (C = 0), SM Eq. 60 converges to the
    symmetric W_p = U tau Lambda ((1+sigma2) Lambda + eta / alpha_p)^{-1} U^T; the skew part vanishes
    and every eigenvalue ends at p*_+ or 0."""
    rng = np.random.default_rng(4)
    d = 5
    Wp0 = rng.standard_normal((d, d)) / np.sqrt(d)
    tr = simulate_reduced(Wp0, Wp0.T @ Wp0 / alpha_p, tau=tau, eta=eta, sigma2=sigma2,
                          alpha_p=alpha_p, symmetric=False, t_end=300.0, dt=0.05, save_every=600)
    lam, U = np.linalg.eigh(tr.F[-1])
    closed = U * (tau * lam / ((1 + sigma2) * lam + eta / alpha_p)) @ U.T
    np.testing.assert_allclose(tr.Wp[-1], closed, atol=1e-7)
    B = 0.5 * (tr.Wp - tr.Wp.mT)
    assert np.linalg.norm(B[-1]) < 1e-6 * np.linalg.norm(B[0])
    p_plus = fixed_points(tau, eta, sigma2)[1]
    ends = np.linalg.eigvalsh(0.5 * (tr.Wp[-1] + tr.Wp[-1].T))
    assert np.all(np.minimum(np.abs(ends), np.abs(ends - p_plus)) < 1e-6)
    assert np.any(np.abs(ends - p_plus) < 1e-6)


def test_reduced_ema_tau_is_eq13_for_one_mode():
    """For d = 1 the least-squares EMA tau of simulate_reduced is exactly Eq. 13."""
    kw = dict(alpha_p=1.3, eta=0.02, sigma2=0.1)
    red = simulate_reduced(np.array([[0.2]]), np.array([[0.05]]), tau=0.1, beta=0.4,
                           t_end=20.0, dt=0.01, save_every=100, **kw)
    _, p, s, tau = simulate_decoupled(0.2, 0.05, tau=0.1, beta=0.4, t_end=20.0, dt=0.01,
                                      save_every=100, **kw)
    np.testing.assert_allclose(red.Wp[:, 0, 0], p, atol=1e-12)
    np.testing.assert_allclose(red.F[:, 0, 0], s, atol=1e-12)
    np.testing.assert_allclose(red.tau, tau, atol=1e-12)
    assert tau[-1] > 0.5


def test_reduced_rejects_asymmetric_input():
    with pytest.raises(ValueError, match="symmetric"):
        simulate_reduced(np.array([[0.0, 1.0], [0.0, 0.0]]), np.eye(2), t_end=1.0, dt=0.1)
    with pytest.raises(ValueError, match="F0"):
        simulate_reduced(np.eye(2), np.array([[0.0, 1.0], [0.0, 0.0]]), t_end=1.0, dt=0.1)
