"""Closed forms of fastpred.theory.analytic against independent computations."""

import numpy as np
import pytest

from fastpred.theory import (K_matrix, K_mode, collapse_threshold, fixed_points,
                             invariant_matrix, mode_fixed_points, mode_invariant,
                             tau_closed_form)


def eq16_roots(tau, eta, sigma2):
    """Non-zero real roots of Eq. 16's right side, p^2 (tau - (1+s2) p) - eta p, by np.roots."""
    roots = np.roots([-(1 + sigma2), tau, -eta])     # p^2 (tau - a p) - eta p = -p (a p^2 - tau p + eta)
    return np.sort(roots[np.abs(roots.imag) < 1e-12].real)


@pytest.mark.parametrize("tau,eta,sigma2", [(1.0, 0.01, 0.0), (1.0, 0.2, 0.1),
                                            (0.6, 0.05, 0.3), (2.0, 0.9, 0.1)])
def test_fixed_points_are_roots_of_eq16(tau, eta, sigma2):
    p_minus, p_plus = fixed_points(tau, eta, sigma2)
    np.testing.assert_allclose([p_minus, p_plus], eq16_roots(tau, eta, sigma2), rtol=1e-10)
    assert 0 < p_minus < p_plus


@pytest.mark.parametrize("tau,sigma2", [(1.0, 0.0), (0.5, 0.2), (2.0, 1.0)])
def test_no_fixed_point_past_threshold(tau, sigma2):
    """Obs #5: above eta = tau^2 / (4 (1+sigma2)) the cubic has no non-zero real root."""
    thr = collapse_threshold(tau, sigma2)
    assert fixed_points(tau, thr * (1 + 1e-6), sigma2) is None
    assert eq16_roots(tau, thr * (1 + 1e-6), sigma2).size == 0
    p_minus, p_plus = fixed_points(tau, thr * (1 - 1e-9), sigma2)   # just below: a double root
    assert p_plus - p_minus < 1e-3


def test_eta_zero_gives_saddle_and_tau_over_one_plus_sigma2():
    assert fixed_points(0.8, 0.0, 0.6) == pytest.approx((0.0, 0.8 / 1.6))


def test_p_minus_monotone_in_eta_and_tau():
    """SM B.2 (Eqs. 96-97): p*_- increases with eta (Obs #4) and decreases with tau (Obs #10)."""
    etas = np.linspace(0.001, 0.24, 40)
    pm_eta = [fixed_points(1.0, e, 0.0)[0] for e in etas]
    assert np.all(np.diff(pm_eta) > 0)
    taus = np.linspace(0.45, 3.0, 40)
    pm_tau = [fixed_points(t, 0.05, 0.0)[0] for t in taus]
    assert np.all(np.diff(pm_tau) < 0)


def test_mode_fixed_points_reduce_to_isotropic():
    assert mode_fixed_points(0.9, 0.03, 1.25, 1.0) == pytest.approx(fixed_points(0.9, 0.03, 0.25))


def test_fixed_points_reject_bad_input():
    with pytest.raises(ValueError, match="eta"):
        fixed_points(1.0, -0.1, 0.0)
    with pytest.raises(ValueError, match="sigma2"):
        fixed_points(1.0, 0.1, -1.0)


@pytest.mark.parametrize("args, error, named", [
    (("a", 0.1, 0.0), TypeError, "tau must be a real number, got 'a'"),  # issue 25: a TypeError naming nothing
    ((1.0, None, 0.0), TypeError, "eta must be a real number, got None"),
    ((float("nan"), 0.1, 0.0), ValueError, "tau must be a finite number, got nan"),
    ((1.0, 0.1, float("inf")), ValueError, "sigma2 must be a finite number"),
])
def test_fixed_points_name_the_argument_that_is_not_a_number(args, error, named):
    with pytest.raises(error) as e:
        fixed_points(*args)
    assert named in str(e.value)


def test_tau_closed_form_constant_p():
    """Eq. 15 with constant p is by hand tau(t) = 1 - exp(-beta t)."""
    t = np.linspace(0, 10, 2001)
    p = np.full((t.size, 3), 0.7)
    tau = tau_closed_form(t, p, beta=0.4)
    np.testing.assert_allclose(tau, (1 - np.exp(-0.4 * t))[:, None] * np.ones(3), atol=1e-12)


def test_tau_closed_form_exponential_p():
    """p = exp(a t): tau = beta (1 - exp(-(a+beta) t)) / (a + beta) by hand."""
    a, beta = 0.3, 0.5
    t = np.linspace(0, 8, 4001)
    tau = tau_closed_form(t, np.exp(a * t), beta)
    np.testing.assert_allclose(tau, beta * (1 - np.exp(-(a + beta) * t)) / (a + beta), atol=1e-12)


def test_K_mode_is_eigenvalue_of_K_matrix_when_aligned():
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    p, s = rng.uniform(-0.5, 1.5, 5), rng.uniform(0, 2, 5)
    K = K_matrix(Q * s @ Q.T, Q * p @ Q.T, 0.7, alpha_p=1.5, eta=0.02, sigma2=0.1)
    expected = K_mode(p, s, 0.7, alpha_p=1.5, eta=0.02, sigma2=0.1)
    np.testing.assert_allclose(np.linalg.eigvalsh(K), np.sort(expected), atol=1e-12)


def test_invariants_vanish_on_balanced_states():
    """C = 0 when W W^T = W_p^T W_p / alpha_p; c_j = 0 on the parabola s = p^2 / alpha_p."""
    rng = np.random.default_rng(1)
    Wp = rng.standard_normal((3, 3))
    u, sv, vt = np.linalg.svd(Wp)
    Q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    W = (vt.T * sv) @ Q[:3] / np.sqrt(2.0)              # W W^T = Wp^T Wp / 2
    assert np.abs(invariant_matrix(W, Wp, 3.0, alpha_p=2.0, eta=0.1)).max() < 1e-12
    assert np.abs(invariant_matrix(W, Wp, 0.0, alpha_p=1.0)).max() > 0.1
    p = np.array([0.2, 1.3])
    np.testing.assert_allclose(mode_invariant(p, p**2 / 3.0, 5.0, alpha_p=3.0, eta=0.2), 0, atol=1e-15)
