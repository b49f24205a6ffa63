"""Per-mode dynamics (Eqs. 11-16, SM Eqs. 102-104) and the observations of §3.2 / SM D.4."""

import numpy as np
import pytest

from fastpred.theory import (collapse_threshold, fixed_points, mode_invariant,
                             simulate_decoupled, simulate_scalar, tau_closed_form)


def test_eq14_invariant_along_trajectories():
    """Eq. 14: s_j(t) = p_j(t)^2 / alpha_p + exp(-2 eta t) c_j with c_j = s_j(0) - p_j(0)^2 / alpha_p,
    while tau(t) follows the EMA (Eq. 13)."""
    p0 = np.array([0.05, 0.3, 0.9, -0.2])
    s0 = np.array([0.2, 0.01, 0.5, 0.3])
    alpha_p, eta = 2.0, 0.05
    t, p, s, tau = simulate_decoupled(p0, s0, tau=0.1, alpha_p=alpha_p, beta=0.3, eta=eta,
                                      sigma2=0.1, t_end=40.0, dt=0.01, save_every=50)
    c = s0 - p0**2 / alpha_p
    predicted = p**2 / alpha_p + np.exp(-2 * eta * t)[:, None] * c
    np.testing.assert_allclose(s, predicted, atol=1e-9)
    np.testing.assert_allclose(mode_invariant(p, s, t, alpha_p=alpha_p, eta=eta),
                               np.broadcast_to(c, p.shape), atol=1e-8)
    assert np.abs(tau[-1] - tau[0]).max() > 0.3 and np.abs(p[-1] - p0).max() > 0.1
    # The main text's printed c_j = p_j(0)^2 / alpha_p - s_j(0) has the wrong sign:
    printed = p**2 / alpha_p - np.exp(-2 * eta * t)[:, None] * c
    assert np.abs(s - printed).max() > 0.1


def test_eq15_tau_on_invariant_parabola():
    """Eq. 15 (quadrature of the integrated p_j) equals tau from integrating Eq. 13, tau(0) = 0, c_j = 0."""
    p0 = np.array([0.2, 0.5, 1.1])
    alpha_p, beta = 1.5, 0.5
    t, p, _, tau = simulate_decoupled(p0, p0**2 / alpha_p, tau=0.0, alpha_p=alpha_p, beta=beta,
                                      eta=0.02, sigma2=0.2, t_end=20.0, dt=0.01)
    np.testing.assert_allclose(tau_closed_form(t, p, beta), tau, atol=1e-7)
    assert tau[-1].min() > 0.5


@pytest.mark.parametrize("tau,eta,sigma2,alpha_p", [(1.0, 0.05, 0.0, 1.0), (0.8, 0.1, 0.2, 2.0),
                                                    (1.0, 0.2, 0.1, 0.5)])
def test_fixed_points_from_either_side_of_p_minus(tau, eta, sigma2, alpha_p):
    """§3.2: on the parabola, p_j(0) just below p*_- collapses to 0; just above it converges to p*_+."""
    p_minus, p_plus = fixed_points(tau, eta, sigma2)
    p0 = p_minus * np.array([0.98, 1.02])
    _, p, s, _ = simulate_decoupled(p0, p0**2 / alpha_p, tau=tau, alpha_p=alpha_p, eta=eta,
                                    sigma2=sigma2, t_end=500.0, dt=0.05, save_every=10000)
    assert p[-1, 0] < 1e-3 * p_minus and s[-1, 0] < 1e-6 * p_minus**2
    assert abs(p[-1, 1] - p_plus) < 1e-6
    assert abs(s[-1, 1] - p_plus**2 / alpha_p) < 1e-6


def measured_basin_edge(tau, eta, sigma2, grid):
    """Smallest p(0) on the parabola that does not collapse, from integration alone."""
    _, p, _, _ = simulate_decoupled(grid, grid**2, tau=tau, eta=eta, sigma2=sigma2,
                                    t_end=200.0, dt=0.1, save_every=2000)
    survived = p[-1] > 0.1
    return grid[np.argmax(survived)] if survived.any() else np.inf


def test_obs4_collapse_basin_grows_with_eta():
    """Obs #4: a larger weight decay enlarges the basin of the collapsed fixed point."""
    grid = np.geomspace(1e-3, 1.0, 150)
    etas = [0.02, 0.05, 0.1, 0.2]
    edges = [measured_basin_edge(1.0, e, 0.0, grid) for e in etas]
    assert np.all(np.diff(edges) > 0)
    step = grid[1] / grid[0]
    for e, edge in zip(etas, edges):                     # and the edge is p*_- (grid resolution)
        assert fixed_points(1.0, e, 0.0)[0] <= edge <= fixed_points(1.0, e, 0.0)[0] * step


@pytest.mark.parametrize("tau,sigma2", [(1.0, 0.0), (0.7, 0.3)])
def test_obs5_every_mode_collapses_past_threshold(tau, sigma2):
    """Obs #5: with eta > tau^2 / (4 (1+sigma2)) every mode goes to p = s = 0, on or off the parabola."""
    eta = 1.05 * collapse_threshold(tau, sigma2)
    rng = np.random.default_rng(0)
    p0 = np.concatenate([np.geomspace(1e-3, 3, 50), rng.uniform(-1, 3, 50)])
    s0 = np.concatenate([p0[:50] ** 2, rng.uniform(0, 3, 50)])
    _, p, s, _ = simulate_decoupled(p0, s0, tau=tau, eta=eta, sigma2=sigma2, t_end=400.0,
                                    dt=0.05, save_every=8000)
    assert np.abs(p[-1]).max() < 1e-4 and s[-1].max() < 1e-8
    # just below the threshold, modes starting above p*_- survive
    _, p, _, _ = simulate_decoupled(p0[:50], s0[:50], tau=tau, eta=0.95 * eta / 1.05,
                                    sigma2=sigma2, t_end=300.0, dt=0.05, save_every=6000)
    assert p[-1].max() > 0.1


@pytest.mark.parametrize("alpha_p", [0.5, 1.0, 4.0])
def test_obs1_obs2_no_weight_decay_end_point(alpha_p):
    """eta = 0: above the parabola (c_j > 0) p_j -> tau/(1+sigma2) and
    s_j(inf) = s_j(0) + (p_j(inf)^2 - p_j(0)^2) / alpha_p (Obs #1, #2)."""
    tau, sigma2 = 0.9, 0.25
    p0 = np.array([-0.3, 0.05, 0.4, 1.5])
    s0 = p0**2 / alpha_p + 0.3
    _, p, s, _ = simulate_decoupled(p0, s0, tau=tau, alpha_p=alpha_p, sigma2=sigma2,
                                    t_end=150.0, dt=0.02, save_every=7500)
    p_inf = tau / (1 + sigma2)
    np.testing.assert_allclose(p[-1], p_inf, atol=1e-8)
    np.testing.assert_allclose(s[-1], s0 + (p_inf**2 - p0**2) / alpha_p, rtol=1e-5)  # RK4 error


def test_decoupled_fixed_tau_output_shapes():
    t, p, s, tau = simulate_decoupled(np.full((2, 3), 0.5), 0.1, tau=0.7, t_end=1.0, dt=0.1)
    assert t.shape == (11,) and p.shape == s.shape == tau.shape == (11, 2, 3)
    assert np.all(tau == 0.7)
    with pytest.raises(ValueError, match="broadcast"):
        simulate_decoupled(np.ones(2), np.ones(3), t_end=1.0, dt=0.1)


# ---- SM D.4, Eqs. 102-104 (Fig. 10) -------------------------------------------------------------

@pytest.mark.parametrize("eta", [0.0, 0.03])
def test_sm_d4_equivalent_to_eqs_11_13(eta):
    """SM D.4: Eqs. 102-104 are Eqs. 11-13 with s = w^2, tau = w_a / w, lambda_s = 1 + sigma2, lambda_d = 1."""
    sigma2, alpha_p, beta = 0.3, 1.7, 0.4
    w0, wp0, wa0 = np.array([0.4, 1.1]), np.array([0.2, 0.7]), np.array([0.1, 0.5])
    tr = simulate_scalar(w0, wp0, wa0, lambda_s=1 + sigma2, lambda_d=1.0, alpha_p=alpha_p,
                         beta=beta, eta=eta, t_end=15.0, dt=0.01, save_every=100)
    _, p, s, tau = simulate_decoupled(wp0, w0**2, tau=wa0 / w0, alpha_p=alpha_p, beta=beta,
                                      eta=eta, sigma2=sigma2, t_end=15.0, dt=0.01, save_every=100)
    np.testing.assert_allclose(tr.wp, p, atol=1e-9)
    np.testing.assert_allclose(tr.w**2, s, atol=1e-9)
    np.testing.assert_allclose(tr.wa / tr.w, tau, atol=1e-9)


def test_sm_d4_tied_weights_reach_noncollapsed_point():
    """Fig. 10 middle: on w = w_p (alpha_p = 1) the flow goes to w = w_a = lambda_d / lambda_s."""
    w0 = np.array([0.05, 0.3, 1.5])
    tr = simulate_scalar(w0, w0, np.array([0.01, 0.8, 0.2]), lambda_s=1.0, lambda_d=0.5,
                         beta=1.0, t_end=150.0, dt=0.02, save_every=7500)
    np.testing.assert_allclose(tr.w[-1], 0.5, atol=1e-6)
    np.testing.assert_allclose(tr.wa[-1], 0.5, atol=1e-6)
    np.testing.assert_array_equal(tr.w, tr.wp)


def test_sm_d4_frozen_target_reaches_hyperbola():
    """Fig. 10 left: w_a = 1 frozen, small generic (w, w_p) escape the origin to w_p w = lambda_d / lambda_s."""
    rng = np.random.default_rng(1)
    w0, wp0 = rng.uniform(0.01, 0.1, 8), rng.uniform(0.01, 0.1, 8)
    tr = simulate_scalar(w0, wp0, 1.0, lambda_s=1.0, lambda_d=0.5, beta=0.0, t_end=60.0,
                         dt=0.02, save_every=3000)
    np.testing.assert_allclose(tr.w[-1] * tr.wp[-1], 0.5, atol=1e-8)
    np.testing.assert_array_equal(tr.wa[-1], 1.0)


def test_sm_d3_no_predictor():
    """SM D.3 / Fig. 10 right: with w_p = 1 only the collapsed point exists when lambda_s > lambda_d;
    with lambda_s = lambda_d, beta w + lambda w_a is conserved and sets the non-collapsed limit."""
    w0, wa0 = np.array([0.5, 1.2, -0.7]), np.array([0.9, 0.1, 0.3])
    tr = simulate_scalar(w0, 5.0, wa0, lambda_s=1.0, lambda_d=0.5, beta=0.5, predictor=False,
                         t_end=100.0, dt=0.02, save_every=5000)
    assert np.abs(tr.w[-1]).max() < 1e-6 and np.abs(tr.wa[-1]).max() < 1e-6
    np.testing.assert_array_equal(tr.wp, 1.0)
    lam, beta = 0.8, 0.5
    tr = simulate_scalar(w0, 1.0, wa0, lambda_s=lam, lambda_d=lam, beta=beta, predictor=False,
                         t_end=100.0, dt=0.02, save_every=5000)
    limit = (beta * w0 + lam * wa0) / (beta + lam)
    np.testing.assert_allclose(tr.w[-1], limit, atol=1e-10)
    np.testing.assert_allclose(tr.wa[-1], limit, atol=1e-10)
