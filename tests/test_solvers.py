"""DirectCopy's closed form, Newton-Schulz and warm-started solvers against a float64 eigh reference."""
import copy

import pytest
import torch

import fastpred.functional as F
from fastpred import DirectPredictor, experimental, solvers
from fastpred.eig_map import EigMap


def spectrum_matrix(d, cond, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), d, dtype=torch.float64)
    if rank is not None:
        s[rank:] = 0
    return (q * s) @ q.T


def exact_weight(corr, eps=0.1, power=0.5, eps_mode="relative", min_eig=1e-4):
    """float64 eigh of the same matrix and Eq. 18's map written out: the yardstick."""
    s, u = torch.linalg.eigh(corr.double())
    s_max = s.clamp(min=0).amax()
    base = s.clamp(min=0) / (s_max if s_max > 0 else 1.0) if eps_mode == "relative" else s.clamp(min=0)
    p = base**power + (eps if eps_mode == "relative" else eps * s_max)
    p = p.clamp(min=min_eig) if eps_mode == "relative" else p
    return (u * p) @ u.T


def rel_err(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("cond, tol", [(1e0, 1e-5), (1e2, 1e-5), (1e4, 1e-4), (1e8, 5e-4)])
@pytest.mark.parametrize("eps_mode", ["relative", "absolute"])
def test_newton_schulz_matches_eigh_across_condition_numbers(cond, tol, eps_mode):
    corr = spectrum_matrix(96, cond).float()
    state = solvers.init_state("newton_schulz", corr)
    w = experimental.newton_schulz_weight(corr, state, EigMap(eps=0.1, eps_mode=eps_mode), iters=20)
    assert rel_err(w, exact_weight(corr, eps_mode=eps_mode)) < tol


def test_newton_schulz_rank_deficient_and_never_blows_up():
    corr = spectrum_matrix(64, 10.0, rank=10).float()
    ref = exact_weight(corr)
    errors = {}
    for iters in (15, 60, 300):  # far past convergence, where plain float32 NS drifts
        state = solvers.init_state("newton_schulz", corr)
        w = experimental.newton_schulz_weight(corr, state, EigMap(eps=0.1), iters=iters)
        assert torch.isfinite(w).all()
        errors[iters] = rel_err(w, ref)
    assert errors[15] < 2e-3
    assert errors[300] <= errors[15] * 1.01  # keeping the best iterate: more iterations never hurt


def test_newton_schulz_zero_matrix_matches_documented_value():
    corr = torch.zeros(5, 5)
    state = solvers.init_state("newton_schulz", corr)
    w = experimental.newton_schulz_weight(corr, state, EigMap(eps=0.1))
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
    w, refreshed = experimental.warm_eigh_weight(corr, state, EigMap(), backend="torch")
    assert refreshed and rel_err(w, exact_weight(corr)) < 1e-5
    moved = spectrum_matrix(48, 1e3, seed=5).float()  # an unrelated matrix: basis useless
    w, refreshed = experimental.warm_eigh_weight(moved, state, EigMap(), backend="torch")
    assert refreshed and rel_err(w, exact_weight(moved)) < 1e-5


@pytest.mark.parametrize("eps_mode, power", [("relative", 0.5), ("absolute", 0.5), ("relative", 1.0)])
def test_warm_solver_tracks_a_slowly_moving_matrix(eps_mode, power):
    d = 48
    g = torch.Generator().manual_seed(1)
    corr = spectrum_matrix(d, 1e2).float()
    basis = solvers.init_state("warm", corr)
    kw = dict(eps=0.1, power=power, eps_mode=eps_mode, min_eig=1e-4)
    experimental.warm_eigh_weight(corr, basis, EigMap(**kw), backend="torch")
    refreshes = 0
    for _ in range(10):
        noise = torch.randn(d, d, generator=g) * 5e-5
        corr = corr + noise + noise.T  # a slow EMA's step
        w, refreshed = experimental.warm_eigh_weight(corr, basis, EigMap(**kw), backend="torch")
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


# ------------------------------------------------------------ DirectCopy's closed form
def ema_trajectory(d, steps, seed=0, n=128):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    corr = torch.zeros(d, d)
    for step in range(steps):
        x = torch.randn(n, d, generator=g) @ mix + 0.1
        F.corr_ema_(corr, x, 0.99, first=step == 0, backend="torch")
        yield corr.clone()


def test_power_one_is_the_closed_form_within_1e6_of_float64_along_a_trajectory():
    """W = F / s_max + eps I, s_max warm-started from the last top eigenvector."""
    top = None
    for corr in ema_trajectory(96, 40):
        top = solvers.init_state("closed_form", corr) if top is None else top
        w = F.directpred_weight(corr, power=1.0, solver_state=top)
        exact = exact_weight(corr, power=1.0)
        assert (w.double() - exact).abs().max().item() < 1e-5
        s_max = torch.linalg.eigvalsh(corr.double())[-1]
        assert abs(solvers.top_eigenvalue(corr, top.clone()).item() / s_max.item() - 1) < 1e-6


@pytest.mark.parametrize("case", ["full-rank", "rank-3", "zero", "batched", "cold"])
def test_closed_form_matches_float64_eigh(case):
    d = 40
    corr = {"full-rank": spectrum_matrix(d, 1e3), "rank-3": spectrum_matrix(d, 10, rank=3),
            "zero": torch.zeros(d, d, dtype=torch.float64),
            "batched": torch.stack([spectrum_matrix(d, 1e2, seed=k) for k in range(3)]),
            "cold": spectrum_matrix(d, 1e2)}[case].float()
    state = None if case == "cold" else solvers.init_state("closed_form", corr)
    w = F.directpred_weight(corr, power=1.0, solver_state=state)
    exact = torch.stack([exact_weight(c, power=1.0) for c in corr.reshape(-1, d, d)]).reshape(corr.shape)
    assert w.dtype == torch.float32 and w.shape == corr.shape
    assert (w.double() - exact).abs().max().item() < 1e-5
    if case == "zero":
        assert torch.equal(w, 0.1 * torch.eye(d))  # p = max(eps, min_eig) = eps, as the eigh path


def test_closed_form_decomposes_no_d_by_d_matrix_and_reads_the_lower_triangle(monkeypatch):
    from fastpred import backends

    sizes = []
    real = backends.resolve("auto", "cpu")
    monkeypatch.setattr(backends, "_resolved", {})
    monkeypatch.setattr(backends, "_resolve", lambda name, device: backends.Backend(
        name=name, device=torch.device(device), gram=real.gram, corr_ema_=real.corr_ema_, rebuild=real.rebuild,
        eigh=lambda a: (sizes.append(a.shape[-1]), real.eigh(a))[1]))
    d = 64
    corr = spectrum_matrix(d, 1e2).float()
    top = solvers.init_state("closed_form", corr)
    sizes.clear()
    w = F.directpred_weight(corr, power=1.0, solver_state=top)
    assert sizes and max(sizes) <= solvers.WARM_STEPS < d  # only the small projected problem
    upper_garbage = corr + torch.triu(torch.full((d, d), 7.0), 1)
    assert torch.equal(F.directpred_weight(upper_garbage, power=1.0, solver_state=top.clone()),
                       F.directpred_weight(corr, power=1.0, solver_state=top.clone()))
    assert torch.equal(w, w.mT)


@pytest.mark.parametrize("kw", [dict(eps_mode="absolute"), dict(eps=1e-5, min_eig=1e-4), dict(power=0.5)])
def test_settings_where_the_closed_form_does_not_hold_take_the_eigh_path(kw):
    args = dict(power=1.0, eps=0.1, eps_mode="relative", min_eig=1e-4) | kw
    assert not EigMap(**args).has_closed_form
    corr = spectrum_matrix(32, 1e6).float()
    w = F.directpred_weight(corr, **args)
    assert (w.double() - exact_weight(corr, **args)).abs().max().item() < 1e-4


def test_nan_in_f_gives_nan_weight():
    corr = spectrum_matrix(16, 10).float()
    corr[3, 2] = float("nan")
    assert torch.isnan(F.directpred_weight(corr, power=1.0)).any()
