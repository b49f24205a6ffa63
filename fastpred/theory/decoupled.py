"""Decoupled per-mode dynamics: Eqs. 11-13 (isotropic data) and SM Eqs. 102-104.

Once the eigenspaces of ``W_p`` and ``F`` align (Theorem 3), each eigenmode
``j`` evolves on its own (§3.1). Both reductions are the scalar
(``n1 = n2 = 1``) case of the full linear dynamics Eqs. 2-4: for Eqs. 11-13
through ``s = W^2``, ``p = W_p``, ``tau = W_a / W`` with ``X = 1``,
``X' = sigma2``; for SM Eqs. 102-104 through ``w = W``, ``w_p = W_p``,
``w_a = W_a`` with ``Sigma^s = lambda_s``, ``Sigma^d = lambda_d``.

Every mode carries its own ``tau_j`` (Eq. 13 and Eq. 95 are per mode): passing
several modes at once integrates several independent 3-D systems.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from ._integrate import rk4

__all__ = [
    "decoupled_field",
    "tau_rate",
    "simulate_decoupled",
    "ScalarTrajectory",
    "scalar_field",
    "simulate_scalar",
]


def decoupled_field(p: np.ndarray, s: np.ndarray, tau: np.ndarray | float, *,
                    alpha_p: float = 1.0, eta: float = 0.0,
                    sigma2: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Right-hand sides of Eqs. 11-12 at fixed ``tau``.

    ``dp/dt = alpha_p s [tau - (1+sigma2) p] - eta p`` (Eq. 11) and
    ``ds/dt = 2 p s [tau - (1+sigma2) p] - 2 eta s`` (Eq. 12).
    """
    gap = tau - (1.0 + sigma2) * p
    return alpha_p * s * gap - eta * p, 2.0 * s * (p * gap - eta)


def tau_rate(p: np.ndarray, tau: np.ndarray, *, beta: float, eta: float = 0.0,
             sigma2: float = 0.0) -> np.ndarray:
    """Eq. 13 solved for ``dtau/dt``: ``beta (1 - tau) - tau (ds/dt) / (2 s)``.

    By Eq. 12, ``(ds/dt) / (2 s) = p [tau - (1+sigma2) p] - eta = Delta_j``,
    which stays finite as ``s -> 0``; this form is used so that a collapsing
    mode does not divide by zero.
    """
    return beta * (1.0 - tau) - tau * (p * (tau - (1.0 + sigma2) * p) - eta)


def simulate_decoupled(p0: ArrayLike, s0: ArrayLike, *, tau: ArrayLike = 1.0,
                       alpha_p: float = 1.0, beta: float | None = None, eta: float = 0.0,
                       sigma2: float = 0.0, t_end: float, dt: float, save_every: int = 1
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Integrate the decoupled BYOL/SimSiam mode dynamics, Eqs. 11-13, with RK4.

    Args:
        p0: initial predictor eigenvalue(s) ``p_j(0)``; scalar or array (one
            entry per mode).
        s0: initial eigenvalue(s) ``s_j(0)`` of ``F = W W^T``; same shape as ``p0``.
        tau: ``W_a = tau W`` (Assumption 1), a scalar or one value per mode.
            Fixed when ``beta is None`` (``tau = 1`` is SimSiam); otherwise
            ``tau_j(0)``, after which each mode's ``tau_j`` follows Eq. 13.
        alpha_p: predictor learning-rate ratio (Eq. 2).
        beta: EMA rate of Eq. 4, or ``None`` for a fixed ``tau``.
        eta: weight decay.
        sigma2: augmentation variance (Assumption 2).
        t_end: final time; dt: RK4 step; save_every: keep every n-th step.

    Returns:
        ``(t, p, s, tau)``: ``t`` of shape ``(T,)``; ``p``, ``s``, ``tau`` of
        shape ``(T, *shape(p0))``. With ``beta=None``, ``tau`` is constant.

    Raises:
        ValueError: if ``p0`` and ``s0`` cannot be broadcast together, or for
            invalid ``t_end``, ``dt``, ``save_every``, ``beta``.

    Example:
        >>> t, p, s, tau = simulate_decoupled([0.5, 0.001], [0.25, 1e-6],
        ...                                   eta=0.01, t_end=200.0, dt=0.05)
        >>> bool(p[-1, 0] > 0.9 and p[-1, 1] < 1e-3)   # p*_- = 0.0101 splits them
        True
    """
    p0 = np.asarray(p0, dtype=np.float64)
    s0 = np.asarray(s0, dtype=np.float64)
    try:
        p0, s0 = np.broadcast_arrays(p0, s0)
    except ValueError as err:
        raise ValueError(f"p0 and s0 must broadcast; got shapes {p0.shape} and {s0.shape}") from err
    if beta is not None and not (np.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be None or a finite number >= 0, got {beta!r}")
    try:
        tau0 = np.broadcast_to(np.asarray(tau, dtype=np.float64), p0.shape).copy()
    except ValueError as err:
        raise ValueError(f"tau must broadcast to the modes' shape {p0.shape}; "
                         f"got shape {np.shape(tau)}") from err
    tau = tau0

    if beta is None:
        def field(_t, y):
            return decoupled_field(y[0], y[1], tau, alpha_p=alpha_p, eta=eta, sigma2=sigma2)

        t, (p, s) = rk4(field, (p0, s0), t_end, dt, save_every)
        return t, p, s, np.broadcast_to(tau0, p.shape).copy()

    def field(_t, y):
        p, s, tj = y
        dp, ds = decoupled_field(p, s, tj, alpha_p=alpha_p, eta=eta, sigma2=sigma2)
        return dp, ds, tau_rate(p, tj, beta=beta, eta=eta, sigma2=sigma2)

    t, (p, s, tj) = rk4(field, (p0, s0, tau0), t_end, dt, save_every)
    return t, p, s, tj


@dataclass(frozen=True)
class ScalarTrajectory:
    """A trajectory of SM Eqs. 102-104: each array has shape ``(T, *shape(w0))``."""

    t: np.ndarray
    w: np.ndarray
    wp: np.ndarray
    wa: np.ndarray


def scalar_field(w, wp, wa, *, lambda_s: float = 1.0, lambda_d: float = 1.0,
                 alpha_p: float = 1.0, beta: float = 1.0, eta: float = 0.0,
                 predictor: bool = True):
    """Right-hand sides of SM Eqs. 102-104 (plus optional weight decay ``eta``).

    ``dw_p/dt = alpha_p [w_a lambda_d - w_p w lambda_s] w - eta w_p`` (102),
    ``dw/dt = w_p [w_a lambda_d - w_p w lambda_s] - eta w`` (103),
    ``dw_a/dt = beta (w - w_a)`` (104). ``predictor=False`` pins ``w_p = 1``
    (SM D.3); ``beta = 0`` freezes the target (SM Fig. 10 left).
    """
    err = wa * lambda_d - wp * w * lambda_s
    dwp = alpha_p * err * w - eta * wp if predictor else np.zeros_like(err)
    return wp * err - eta * w, dwp, beta * (w - wa)


def simulate_scalar(w0: ArrayLike, wp0: ArrayLike, wa0: ArrayLike, *, lambda_s: float = 1.0,
                    lambda_d: float = 1.0,
                    alpha_p: float = 1.0, beta: float = 1.0, eta: float = 0.0,
                    predictor: bool = True, t_end: float, dt: float,
                    save_every: int = 1) -> ScalarTrajectory:
    """Integrate SM Eqs. 102-104 (one eigenmode of general data, SM D.4) with RK4.

    Args:
        w0, wp0, wa0: initial online, predictor and target weights (scalars or
            broadcastable arrays; one entry per independent system).
            ``wp0`` is ignored (set to 1) when ``predictor=False``.
        lambda_s, lambda_d: eigenvalues of ``Sigma^s`` and ``Sigma^d`` for the mode.
        alpha_p: predictor rate ratio; beta: EMA rate (0 = frozen target);
        eta: weight decay (0 in the paper's Eqs. 102-104).
        predictor: ``False`` removes the predictor (``w_p = 1``, SM D.3).
        t_end, dt, save_every: see :func:`fastpred.theory._integrate.rk4`.

    Returns:
        A :class:`ScalarTrajectory`.
    """
    w0, wp0, wa0 = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (w0, wp0, wa0)))
    if not predictor:
        wp0 = np.ones_like(w0)
    kw = dict(lambda_s=lambda_s, lambda_d=lambda_d, alpha_p=alpha_p, beta=beta,
              eta=eta, predictor=predictor)

    def field(_t, y):
        dw, dwp, dwa = scalar_field(y[0], y[1], y[2], **kw)
        return dw, dwp, dwa

    t, (w, wp, wa) = rk4(field, (w0, wp0, wa0), t_end, dt, save_every)
    return ScalarTrajectory(t, w, wp, wa)
