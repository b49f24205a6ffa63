"""Finite-batch SGD on Eq. 1 against the gradient flow of Lemma 1."""

import numpy as np
import pytest

from fastpred.theory import (AdditiveScrambling, LinearConfig, isotropic, linear_field,
                             sgd_step, simulate_linear, simulate_sgd)

N1, N2 = 5, 3


def model():
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((N1, N1)), rng.standard_normal((N1, N1))
    return AdditiveScrambling(A @ A.T / N1 + 0.2 * np.eye(N1), 0.3 * B @ B.T / N1)


def state(seed):
    rng = np.random.default_rng(seed)
    return (0.5 * rng.standard_normal((N2, N1)), 0.5 * rng.standard_normal((N2, N2)),
            0.5 * rng.standard_normal((N2, N1)))


@pytest.mark.parametrize("cfg", [
    LinearConfig(alpha_p=1.7, eta=0.03, target="ema", beta=0.5),
    LinearConfig(alpha_p=0.5, target="online"),
    LinearConfig(eta=0.1, target="scaled", tau=0.6),
    LinearConfig(target="online", predictor=False),
], ids=["byol", "simsiam", "scaled", "nopredictor"])
def test_sgd_step_is_flow_with_batch_moments(cfg):
    """One SGD step equals lr times the flow of Eqs. 2-4 evaluated with the batch's own moments
    (X -> E_B[x2 x1^T], X + X' -> E_B[x1 x1^T])."""
    W, Wp, Wa = state(1)
    if not cfg.predictor:
        Wp = np.eye(N2)
    x1, x2 = model().sample(64, np.random.default_rng(2))
    S, Xb = x1.T @ x1 / 64, x2.T @ x1 / 64
    lr = 0.01
    W1, Wp1, Wa1 = sgd_step(W, Wp, Wa, x1, x2, cfg, lr)
    dW, dWp, dWa = linear_field(W, Wp, Wa, Xb, S - Xb, cfg)
    np.testing.assert_allclose((W1 - W) / lr, dW, atol=1e-10)
    np.testing.assert_allclose((Wp1 - Wp) / lr, dWp, atol=1e-10)
    np.testing.assert_allclose((Wa1 - Wa) / lr, dWa, atol=1e-10)


def test_sgd_without_stop_gradient_matches_eq50_on_average():
    """Large-batch SGD gradient without stop-gradient ~ SM Eq. 50 (population moments)."""
    m, cfg = model(), LinearConfig(eta=0.05, target="online", stop_grad=False)
    W, Wp, _ = state(3)
    x1, x2 = m.sample(100_000, np.random.default_rng(4))
    W1, _, _ = sgd_step(W, Wp, W, x1, x2, cfg, 1.0)
    dW, _, _ = linear_field(W, Wp, W, m.X, m.X_prime, cfg)
    assert np.abs((W1 - W) - dW).max() < 0.03 * np.abs(dW).max()


def test_sgd_tracks_gradient_flow():
    """Lemma 1's limit: small lr, large batch SGD stays close to the flow over t = 10."""
    m = isotropic(N1, 0.2)
    W0, Wp0, _ = state(5)
    cfg = LinearConfig(eta=0.02, target="ema", beta=0.5)
    sgd = simulate_sgd(m, W0, cfg, lr=0.01, steps=1000, batch_size=512, Wp0=Wp0,
                       rng=np.random.default_rng(6), save_every=250)
    ode = simulate_linear(W0, m.X, m.X_prime, cfg, Wp0=Wp0, t_end=10.0, dt=0.01,
                          save_every=250)
    np.testing.assert_allclose(sgd.t, ode.t)
    rel = np.linalg.norm(sgd.W - ode.W, axis=(1, 2)) / np.linalg.norm(ode.W, axis=(1, 2))
    assert rel.max() < 0.05
    assert np.linalg.norm(ode.W[-1] - W0) > 0.3 * np.linalg.norm(W0)   # the flow did move


def test_sgd_rejects_bad_arguments():
    W0, Wp0, _ = state(7)
    with pytest.raises(ValueError, match="lr"):
        simulate_sgd(model(), W0, LinearConfig(target="online"), lr=0.0, steps=1, batch_size=4,
                     Wp0=Wp0, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="Wp0"):
        simulate_sgd(model(), W0, LinearConfig(target="online"), lr=0.1, steps=1, batch_size=4,
                     rng=np.random.default_rng(0))
