"""SM D: scrambling models (D.2), what BYOL / SimSiam learn from them (D.1), the predictor's role (D.3)."""

import numpy as np
import pytest
from scipy.linalg import subspace_angles

from fastpred.theory import (AdditiveScrambling, LinearConfig, MultiplicativeScrambling,
                             isotropic, simulate_linear, target_operator,
                             top_left_eigenvectors)

N0, K, N2 = 6, 3, 3


def multiplicative(seed=0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((N0, N0))
    U, _ = np.linalg.qr(rng.standard_normal((N0, K)))
    return MultiplicativeScrambling(A @ A.T / N0 + 0.2 * np.eye(N0), U)   # Sigma^x not commuting with P^c


def additive(seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((N0, N0)))
    lam_x = np.array([1.0, 0.8, 1.2, 0.9, 1.1, 1.0])
    lam_n = np.array([0.1, 0.3, 0.6, 1.5, 2.5, 4.0])
    return AdditiveScrambling(Q * lam_x @ Q.T, Q * lam_n @ Q.T)


@pytest.mark.parametrize("make", [multiplicative, additive])
def test_moments_match_monte_carlo(make):
    """Sigma^s = E[x1 x1^T] and Sigma^d = E[x1 x2^T] of each model against 50k sampled view pairs."""
    model = make()
    x1, x2 = model.sample(50_000, np.random.default_rng(1))
    n = len(x1)
    emp_s = 0.5 * (x1.T @ x1 + x2.T @ x2) / n
    emp_d = 0.5 * (x1.T @ x2 + x2.T @ x1) / n
    scale = np.abs(model.sigma_s).max()
    assert np.abs(emp_s - model.sigma_s).max() < 0.03 * scale
    assert np.abs(emp_d - model.sigma_d).max() < 0.03 * scale


def test_multiplicative_sigma_s_differs_from_paper_statement():
    """SM D.2 says Sigma^s = Sigma^x; sampling the stated augmentation says otherwise
    (it is P^c Sigma^x P^c + tr(U^T Sigma^x U) U U^T), yet Sigma^d [Sigma^s]^{-1} = P^c as the paper concludes."""
    model = multiplicative()
    x1, _ = model.sample(50_000, np.random.default_rng(2))
    emp_s = x1.T @ x1 / len(x1)
    assert np.abs(emp_s - model.sigma_x).max() > 0.3
    np.testing.assert_allclose(target_operator(model), model.P_c, atol=1e-12)


def test_additive_target_operator_eigenvalues_below_one():
    """SM D.2-D.3: Sigma^x [Sigma^x + Sigma^n]^{-1} has eigenvalues lambda_x / (lambda_x + lambda_n) < 1."""
    model = additive()
    ev = np.sort(np.linalg.eigvals(target_operator(model)).real)
    lam_x = np.array([1.0, 0.8, 1.2, 0.9, 1.1, 1.0])
    lam_n = np.array([0.1, 0.3, 0.6, 1.5, 2.5, 4.0])
    np.testing.assert_allclose(ev, np.sort(lam_x / (lam_x + lam_n)), atol=1e-12)
    assert ev.max() < 1


@pytest.mark.parametrize("make", [multiplicative, additive], ids=["multiplicative", "additive"])
@pytest.mark.parametrize("beta", [None, 0.5], ids=["simsiam", "byol"])
def test_learned_W_spans_top_eigenmodes(make, beta):
    """SM D.1-D.2: from a small random start the rows of W converge to the span of the top-n2
    left eigenvectors of Sigma^d [Sigma^s]^{-1}, at a fixed point of SM Eq. 101 (W_p W = W M)."""
    model = make()
    M = target_operator(model)
    _, top = top_left_eigenvectors(M, N2)
    rng = np.random.default_rng(3)
    cfg = LinearConfig(target="online") if beta is None else LinearConfig(target="ema", beta=beta)
    tr = simulate_linear(0.1 * rng.standard_normal((N2, N0)), model.X, model.X_prime, cfg,
                         Wp0=0.1 * rng.standard_normal((N2, N2)), t_end=150.0, dt=0.05,
                         save_every=3000)
    W, Wp = tr.W[-1], tr.Wp[-1]
    assert np.linalg.svd(W, compute_uv=False).min() > 0.3            # not collapsed
    assert subspace_angles(W.T, top.T).max() < 1e-4                  # radians
    assert np.abs(Wp @ W - W @ M).max() < 1e-4
    # the start was not already aligned
    assert subspace_angles(tr.W[0].T, top.T).max() > 0.3


def test_no_predictor_multiplicative_keeps_conserved_subspace():
    """SM D.3: without a predictor, multiplicative scrambling (eigenvalue 1 of Sigma^d [Sigma^s]^{-1})
    still has non-collapsed solutions: W_U -> 0 and beta W P^c + W_a Sigma^d is conserved, so
    W(inf) = (beta W(0) P^c + W_a(0) Sigma^d) (beta P^c + Sigma^d)^+."""
    model = multiplicative()
    rng = np.random.default_rng(4)
    W0, Wa0, beta = rng.standard_normal((N2, N0)), rng.standard_normal((N2, N0)), 0.5
    cfg = LinearConfig(target="ema", beta=beta, predictor=False)
    tr = simulate_linear(W0, model.X, model.X_prime, cfg, Wa0=Wa0, t_end=120.0, dt=0.05,
                         save_every=2400)
    D, Pc = model.sigma_d, model.P_c
    limit = (beta * W0 @ Pc + Wa0 @ D) @ np.linalg.pinv(beta * Pc + D, hermitian=True)
    np.testing.assert_allclose(tr.W[-1], limit, atol=1e-8)
    np.testing.assert_allclose(tr.Wa[-1], limit, atol=1e-8)
    assert np.linalg.norm(limit) > 0.3


def test_no_predictor_additive_collapses():
    """SM D.3: with all eigenvalues of Sigma^x [Sigma^x + Sigma^n]^{-1} below 1 and no predictor,
    BYOL (EMA target) collapses: W, W_a -> 0."""
    model = additive()
    rng = np.random.default_rng(5)
    W0 = rng.standard_normal((N2, N0))
    cfg = LinearConfig(target="ema", beta=0.5, predictor=False)
    tr = simulate_linear(W0, model.X, model.X_prime, cfg, Wa0=W0, t_end=200.0, dt=0.05,
                         save_every=4000)
    assert np.linalg.norm(tr.W[-1]) < 1e-3 * np.linalg.norm(W0)
    assert np.linalg.norm(tr.Wa[-1]) < 1e-3 * np.linalg.norm(W0)


def test_models_reject_bad_input():
    with pytest.raises(ValueError, match="orthonormal"):
        MultiplicativeScrambling(np.eye(3), np.ones((3, 1)))
    with pytest.raises(ValueError, match="symmetric"):
        AdditiveScrambling(np.array([[1.0, 1.0], [0.0, 1.0]]), np.eye(2))
    with pytest.raises(ValueError, match="sigma2"):
        isotropic(3, -1.0)


def test_isotropic_names_a_nan_variance():
    # issue 25: "sigma_n must be symmetric" when the problem was the NaN
    with pytest.raises(ValueError, match="sigma2 must be a finite number, got nan"):
        isotropic(3, float("nan"))
    with pytest.raises(TypeError, match="n must be an integer"):
        isotropic(2.5, 0.1)


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_top_left_eigenvectors_returns_exactly_k(k):
    M = np.diag([3.0, 1.0, 2.0])  # left eigenvectors e_0, e_2, e_1 in decreasing eigenvalue order
    evals, basis = top_left_eigenvectors(M, k)
    assert evals.shape == (k,) and basis.shape == (k, 3)
    np.testing.assert_allclose(evals, [3.0, 2.0, 1.0][:k])
    np.testing.assert_allclose(np.abs(basis), np.eye(3)[[0, 2, 1][:k]], atol=1e-12)


@pytest.mark.parametrize("k", [-1, 4, 5])
def test_top_left_eigenvectors_refuses_k_out_of_range(k):
    # issue 25.3: k=-1 returned 2 of 3 eigenvectors (a NumPy slice), k=5 returned 3
    with pytest.raises(ValueError, match=rf"k must be in \[0, 3\], got {k}"):
        top_left_eigenvectors(np.eye(3), k)
