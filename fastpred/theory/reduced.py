"""Dynamics of ``W_p`` and ``F = W W^T`` under Assumptions 1-2 (SM Eqs. 60-61) and 3 (Eq. 7).

With ``X = I``, ``X' = sigma2 I`` and ``W_a = tau W``:

* asymmetric (SM Eqs. 60-61):
  ``dW_p/dt = -alpha_p (1+sigma2) W_p F + alpha_p tau F - eta W_p``,
  ``dF/dt = -(1+sigma2)(W_p^T W_p F + F W_p^T W_p) + tau (W_p^T F + F W_p) - 2 eta F``;
* symmetrized (Eq. 7 = SM Eq. 65), ``{A, B} = AB + BA``:
  ``dW_p/dt = -alpha_p/2 (1+sigma2) {W_p, F} + alpha_p tau F - eta W_p``,
  ``dF/dt = -(1+sigma2) {W_p^2, F} + tau {W_p, F} - 2 eta F``.

``tau`` is fixed, or follows the EMA: Assumption 1 inserted into Eq. 4 gives
``dtau/dt W + tau dW/dt = beta (1 - tau) W`` (SM Eq. 85), which one scalar
``tau`` cannot satisfy exactly for a matrix ``W``. We take its least-squares
solution, ``dtau/dt = beta (1 - tau) - tau <dW/dt, W> / <W, W>
= beta (1 - tau) - tau tr(dF/dt) / (2 tr F)`` (``X = I``), which is Eq. 13 when
``F`` has a single mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._integrate import rk4

__all__ = ["ReducedTrajectory", "reduced_field", "simulate_reduced"]


def _anti(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    return A @ B + B @ A


def reduced_field(Wp: np.ndarray, F: np.ndarray, tau, *, alpha_p: float = 1.0,
                  eta: float = 0.0, sigma2: float = 0.0, symmetric: bool = True):
    """Time derivatives ``(dW_p, dF)`` of Eq. 7 (``symmetric``) or SM Eqs. 60-61.

    Args:
        Wp, F: ``(..., d, d)``; tau: scalar or ``(...)``.
    """
    tau = np.asarray(tau, dtype=np.float64)[..., None, None]
    a = 1.0 + sigma2
    if symmetric:
        dWp = -0.5 * alpha_p * a * _anti(Wp, F) + alpha_p * tau * F - eta * Wp
        dF = -a * _anti(Wp @ Wp, F) + tau * _anti(Wp, F) - 2.0 * eta * F
    else:
        dWp = -alpha_p * a * Wp @ F + alpha_p * tau * F - eta * Wp
        P = Wp.mT @ Wp
        dF = -a * (P @ F + F @ P) + tau * (Wp.mT @ F + F @ Wp) - 2.0 * eta * F
    return dWp, dF


@dataclass(frozen=True)
class ReducedTrajectory:
    """``t`` ``(T,)``, ``Wp`` and ``F`` ``(T, ..., d, d)``, ``tau`` ``(T, ...)``."""

    t: np.ndarray
    Wp: np.ndarray
    F: np.ndarray
    tau: np.ndarray


def simulate_reduced(Wp0: np.ndarray, F0: np.ndarray, *, tau: float = 1.0,
                     beta: float | None = None, alpha_p: float = 1.0, eta: float = 0.0,
                     sigma2: float = 0.0, symmetric: bool = True, t_end: float,
                     dt: float, save_every: int = 1) -> ReducedTrajectory:
    """Integrate Eq. 7 (``symmetric=True``) or SM Eqs. 60-61 with RK4.

    Args:
        Wp0: ``W_p(0)``, ``(..., d, d)``; symmetric when ``symmetric=True``.
        F0: ``F(0)``, symmetric PSD, ``(..., d, d)``.
        tau: fixed ``tau``, or ``tau(0)`` when ``beta`` is given.
        beta: EMA rate (see the module docstring), or ``None`` for fixed ``tau``.
        alpha_p, eta, sigma2: as in Eq. 7.
        symmetric: Assumption 3 (Eq. 7) or the raw SM Eqs. 60-61.
        t_end, dt, save_every: see :func:`fastpred.theory._integrate.rk4`.

    Returns:
        A :class:`ReducedTrajectory`.

    Raises:
        ValueError: for shape mismatches, a non-symmetric ``F0``, or a
            non-symmetric ``Wp0`` with ``symmetric=True``.
    """
    Wp0 = np.asarray(Wp0, dtype=np.float64)
    F0 = np.asarray(F0, dtype=np.float64)
    if Wp0.shape[-2:] != F0.shape[-2:] or Wp0.shape[-1] != Wp0.shape[-2]:
        raise ValueError(f"Wp0 and F0 must be square of one size; got {Wp0.shape}, {F0.shape}")
    Wp0, F0 = np.broadcast_arrays(Wp0, F0)
    if not np.allclose(F0, F0.mT, rtol=0, atol=1e-12):
        raise ValueError("F0 must be symmetric (F = W W^T)")
    if symmetric and not np.allclose(Wp0, Wp0.mT, rtol=0, atol=1e-12):
        raise ValueError("symmetric=True needs a symmetric Wp0 (Assumption 3)")
    kw = dict(alpha_p=alpha_p, eta=eta, sigma2=sigma2, symmetric=symmetric)
    tau0 = np.full(Wp0.shape[:-2], float(tau))

    if beta is None:
        def field(_t, y):
            return reduced_field(y[0], y[1], tau, **kw)

        t, (Wp, F) = rk4(field, (Wp0, F0), t_end, dt, save_every)
        return ReducedTrajectory(t, Wp, F, np.broadcast_to(tau0, t.shape + tau0.shape).copy())

    def field(_t, y):
        Wp, F, tj = y
        dWp, dF = reduced_field(Wp, F, tj, **kw)
        trF = np.trace(F, axis1=-2, axis2=-1)
        dtau = beta * (1.0 - tj) - tj * np.trace(dF, axis1=-2, axis2=-1) / (2.0 * trF)
        return dWp, dF, dtau

    t, (Wp, F, tj) = rk4(field, (Wp0, F0, tau0), t_end, dt, save_every)
    return ReducedTrajectory(t, Wp, F, tj)
