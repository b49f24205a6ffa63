"""Fixed-step classical Runge-Kutta (RK4) integration of tuples of float64 arrays.

Every simulator in :mod:`fastpred.theory` integrates its gradient flow with
:func:`rk4`. The tests cross-check it against ``scipy.integrate.solve_ivp``
(an adaptive Dormand-Prince integrator) so that the two share no code.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

State = tuple[np.ndarray, ...]
Field = Callable[[float, State], State]


def step_count(t_end: float, dt: float) -> tuple[int, float]:
    """Number of steps and the step actually used to cover ``[0, t_end]``.

    The step is shrunk (never grown) so that a whole number of steps ends
    exactly at ``t_end``.

    Raises:
        ValueError: if ``t_end`` or ``dt`` is not a positive finite number.
    """
    if not (np.isfinite(t_end) and t_end > 0):
        raise ValueError(f"t_end must be a positive finite number, got {t_end!r}")
    if not (np.isfinite(dt) and dt > 0):
        raise ValueError(f"dt must be a positive finite number, got {dt!r}")
    n = max(1, int(np.ceil(t_end / dt - 1e-9)))
    return n, t_end / n


def rk4(field: Field, y0: Sequence[np.ndarray], t_end: float, dt: float,
        save_every: int = 1) -> tuple[np.ndarray, State]:
    """Integrate ``dy/dt = field(t, y)`` from ``t = 0`` to ``t_end`` with RK4.

    Args:
        field: maps ``(t, y)`` to the tuple of time derivatives of ``y``.
        y0: initial state, a sequence of arrays (any shapes).
        t_end: final time.
        dt: largest step; see :func:`step_count`.
        save_every: keep every ``save_every``-th step (the last step is always kept).

    Returns:
        ``(t, ys)``: ``t`` of shape ``(n_saved,)`` and, for each state array of
        shape ``S``, a trajectory of shape ``(n_saved, *S)``.

    Raises:
        ValueError: for a non-positive ``t_end``, ``dt`` or ``save_every``.
    """
    if int(save_every) != save_every or save_every < 1:
        raise ValueError(f"save_every must be a positive integer, got {save_every!r}")
    n, h = step_count(t_end, dt)
    y = tuple(np.array(a, dtype=np.float64, copy=True) for a in y0)
    saved = list(range(0, n + 1, save_every))
    if saved[-1] != n:
        saved.append(n)
    t_out = np.asarray(saved, dtype=np.float64) * h
    out = tuple(np.empty((len(saved),) + a.shape) for a in y)
    for traj, a in zip(out, y):
        traj[0] = a
    slot = 1
    for i in range(n):
        t = i * h
        k1 = field(t, y)
        k2 = field(t + h / 2, tuple(a + (h / 2) * k for a, k in zip(y, k1)))
        k3 = field(t + h / 2, tuple(a + (h / 2) * k for a, k in zip(y, k2)))
        k4 = field(t + h, tuple(a + h * k for a, k in zip(y, k3)))
        y = tuple(a + (h / 6) * (b1 + 2 * b2 + 2 * b3 + b4)
                  for a, b1, b2, b3, b4 in zip(y, k1, k2, k3, k4))
        if slot < len(saved) and saved[slot] == i + 1:
            for traj, a in zip(out, y):
                traj[slot] = a
            slot += 1
    return t_out, out
