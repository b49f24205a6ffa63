"""The RK4 integrator against closed forms and scipy's adaptive DOP853."""

import numpy as np
import pytest
from scipy.integrate import solve_ivp

from fastpred.theory import LinearConfig, linear_field, simulate_linear
from fastpred.theory._integrate import rk4


def test_rk4_fourth_order_on_oscillator():
    """y'' = -y from (1, 0): error at t = 10 shrinks ~16x per halving of dt."""
    def field(_t, y):
        return (y[1], -y[0])

    errs = []
    for dt in (0.1, 0.05, 0.025):
        t, (x, v) = rk4(field, (np.array(1.0), np.array(0.0)), 10.0, dt)
        errs.append(abs(x[-1] - np.cos(10.0)))
        assert t[-1] == pytest.approx(10.0)
    assert errs[0] / errs[1] == pytest.approx(16, rel=0.15)
    assert errs[1] / errs[2] == pytest.approx(16, rel=0.15)


def test_rk4_saves_last_step_and_shrinks_dt():
    t, (y,) = rk4(lambda _t, y: (-y[0],), (np.ones(2),), 1.0, 0.3, save_every=2)
    np.testing.assert_allclose(t, [0.0, 0.5, 1.0])       # 4 steps of 0.25
    np.testing.assert_allclose(y[-1], np.exp(-1.0), rtol=1e-3)


@pytest.mark.parametrize("bad", [dict(t_end=0.0, dt=0.1), dict(t_end=1.0, dt=-1.0),
                                 dict(t_end=1.0, dt=0.1, save_every=0)])
def test_rk4_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        rk4(lambda _t, y: (y[0],), (np.ones(1),), **bad)


def test_simulate_linear_matches_solve_ivp():
    """The full BYOL flow by our RK4 and by scipy's DOP853 at rtol 1e-11 agree."""
    rng = np.random.default_rng(0)
    n1, n2 = 4, 3
    A = rng.standard_normal((n1, n1))
    X, Xp = A @ A.T / n1, 0.2 * np.eye(n1)
    W0, Wp0 = rng.standard_normal((n2, n1)) * 0.5, rng.standard_normal((n2, n2)) * 0.5
    cfg = LinearConfig(alpha_p=1.5, eta=0.02, target="ema", beta=0.7)
    tr = simulate_linear(W0, X, Xp, cfg, Wp0=Wp0, t_end=10.0, dt=0.01, save_every=1000)

    sizes = (n2 * n1, n2 * n2, n2 * n1)

    def flat(_t, y):
        W, Wp, Wa = np.split(y, np.cumsum(sizes)[:-1])
        out = linear_field(W.reshape(n2, n1), Wp.reshape(n2, n2), Wa.reshape(n2, n1), X, Xp, cfg)
        return np.concatenate([o.ravel() for o in out])

    y0 = np.concatenate([W0.ravel(), Wp0.ravel(), np.zeros(n2 * n1)])
    ref = solve_ivp(flat, (0, 10.0), y0, method="DOP853", rtol=1e-11, atol=1e-13).y[:, -1]
    ours = np.concatenate([tr.W[-1].ravel(), tr.Wp[-1].ravel(), tr.Wa[-1].ravel()])
    assert np.abs(ours - ref).max() < 1e-8
    assert np.abs(ref - y0).max() > 0.1                  # the state did move
