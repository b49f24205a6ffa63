"""Newton-Schulz and warm-started solvers against a float64 eigh reference."""
import copy

import pytest
import torch

import fastpred.functional as F
from fastpred import DirectPredictor, solvers


def spectrum_matrix(d, cond, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), d, dtype=torch.float64)
    if rank is not None:
        s[rank:] = 0
    return (q * s) @ q.T


def exact_weight(corr, **kw):
    """float64 eigh of the same matrix: the yardstick."""
    return F.directpred_weight(corr.double(), backend="torch", **kw).double()


def rel_err(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("cond, tol", [(1e0, 1e-5), (1e2, 1e-5), (1e4, 1e-4), (1e8, 5e-4)])
@pytest.mark.parametrize("eps_mode", ["relative", "absolute"])
def test_newton_schulz_matches_eigh_across_condition_numbers(cond, tol, eps_mode):
    corr = spectrum_matrix(96, cond).float()
    state = solvers.init_state("newton_schulz", corr)
    w = solvers.newton_schulz_weight(corr, state, eps=0.1, eps_mode=eps_mode, min_eig=1e-4, iters=20)
    assert rel_err(w, exact_weight(corr, eps_mode=eps_mode)) < tol


def test_newton_schulz_rank_deficient_and_never_blows_up():
    corr = spectrum_matrix(64, 10.0, rank=10).float()
    ref = exact_weight(corr)
    errors = {}
    for iters in (15, 60, 300):  # far past convergence, where plain float32 NS drifts
        state = solvers.init_state("newton_schulz", corr)
        w = solvers.newton_schulz_weight(corr, state, eps=0.1, eps_mode="relative", min_eig=1e-4, iters=iters)
        assert torch.isfinite(w).all()
        errors[iters] = rel_err(w, ref)
    assert errors[15] < 2e-3
    assert errors[300] <= errors[15] * 1.01  # keeping the best iterate: more iterations never hurt


def test_newton_schulz_zero_matrix_matches_documented_value():
    corr = torch.zeros(5, 5)
    state = solvers.init_state("newton_schulz", corr)
    w = solvers.newton_schulz_weight(corr, state, eps=0.1, eps_mode="relative", min_eig=1e-4)
    torch.testing.assert_close(w, 0.1 * torch.eye(5))


def test_newton_schulz_rejects_other_powers_and_small_eps():
    with pytest.raises(ValueError, match="power"):
        DirectPredictor(4, solver="newton_schulz", power=1.0)
    with pytest.raises(ValueError, match="solver"):
        DirectPredictor(4, solver="qr")
    with pytest.raises(ValueError, match="min_eig"):
        F.directpred_weight(torch.eye(3), solver="newton_schulz", eps=0.0,
                            solver_state=solvers.init_state("newton_schulz", torch.eye(3)))


def test_warm_solver_first_call_and_large_moves_fall_back_to_eigh():
    corr = spectrum_matrix(48, 1e3).float()
    state = solvers.init_state("warm", corr)
    w, refreshed = solvers.warm_eigh_weight(corr, state, torch.linalg.eigh, eps=0.1, power=0.5,
                                            eps_mode="relative", min_eig=1e-4)
    assert refreshed and rel_err(w, exact_weight(corr)) < 1e-5
    moved = spectrum_matrix(48, 1e3, seed=5).float()  # an unrelated matrix: basis useless
    w, refreshed = solvers.warm_eigh_weight(moved, state, torch.linalg.eigh, eps=0.1, power=0.5,
                                            eps_mode="relative", min_eig=1e-4)
    assert refreshed and rel_err(w, exact_weight(moved)) < 1e-5


@pytest.mark.parametrize("eps_mode, power", [("relative", 0.5), ("absolute", 0.5), ("relative", 1.0)])
def test_warm_solver_tracks_a_slowly_moving_matrix(eps_mode, power):
    d = 48
    g = torch.Generator().manual_seed(1)
    corr = spectrum_matrix(d, 1e2).float()
    basis = solvers.init_state("warm", corr)
    kw = dict(eps=0.1, power=power, eps_mode=eps_mode, min_eig=1e-4)
    solvers.warm_eigh_weight(corr, basis, torch.linalg.eigh, **kw)
    refreshes = 0
    for _ in range(10):
        noise = torch.randn(d, d, generator=g) * 5e-5
        corr = corr + noise + noise.T  # a slow EMA's step
        w, refreshed = solvers.warm_eigh_weight(corr, basis, torch.linalg.eigh, **kw)
        refreshes += refreshed
        assert rel_err(w, exact_weight(corr, **kw)) < 1e-4
    assert refreshes == 0  # the refinement, not the fallback, did the work


@pytest.mark.parametrize("solver", ["newton_schulz", "warm"])
def test_module_with_solver_matches_eigh_and_resumes_identically(solver):
    d = 24
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    xs = [torch.randn(96, d, generator=g) @ mix for _ in range(8)]
    torch.manual_seed(0)
    exact = DirectPredictor(d, rho=0.95)
    torch.manual_seed(0)
    fast = DirectPredictor(d, rho=0.95, solver=solver)
    for x in xs[:4]:
        exact(x); fast(x)
    assert rel_err(fast.weight.detach(), exact.weight.detach().double()) < 2e-3
    twin = DirectPredictor(d, rho=0.95, solver=solver)
    twin.load_state_dict(copy.deepcopy(fast.state_dict()))
    for x in xs[4:]:
        assert torch.equal(fast(x), twin(x))
