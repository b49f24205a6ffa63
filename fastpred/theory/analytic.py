"""Closed forms of the paper's theory: fixed points, invariants, K(t), tau(t).

Equation numbers refer to Tian, Chen & Ganguli (ICML 2021), main text unless
marked SM (supplementary material).

Two notes on the paper's text, both checked numerically in ``tests/theory``:

* Eq. 14 defines ``c_j = alpha_p^{-1} p_j(0)^2 - s_j(0)``; the integral
  ``s_j(t) = alpha_p^{-1} p_j(t)^2 + exp(-2 eta t) c_j`` it states (and SM
  Eqs. 82-83) needs the opposite sign, ``c_j = s_j(0) - alpha_p^{-1} p_j(0)^2``.
  :func:`mode_invariant` uses the sign that makes the integral hold.
* SM Eq. 41 omits the ``alpha_p^{-1}`` of main-text Eq. 5; :func:`invariant_matrix`
  follows Eq. 5.
"""

from __future__ import annotations

import math

import numpy as np

from ._checks import nonneg, real

__all__ = [
    "collapse_threshold",
    "fixed_points",
    "mode_fixed_points",
    "mode_invariant",
    "invariant_matrix",
    "K_matrix",
    "K_mode",
    "delta",
    "commutator",
    "tau_closed_form",
    "ema_tau",
    "normalized_correlation",
]


def collapse_threshold(tau: float, sigma2: float) -> float:
    """Largest weight decay with non-collapsed fixed points, ``tau^2 / (4 (1 + sigma2))``.

    Above it only the collapsed fixed point ``p = 0`` of Eq. 16 remains (Obs #5).
    """
    tau, sigma2 = real("tau", tau), nonneg("sigma2", sigma2)
    return tau * tau / (4.0 * (1.0 + sigma2))


def fixed_points(tau: float, eta: float, sigma2: float) -> tuple[float, float] | None:
    """Non-collapsed fixed points ``(p*_-, p*_+)`` of Eq. 16 at fixed ``tau`` (§3.2).

    ``p*_pm = (tau pm sqrt(tau^2 - 4 eta (1 + sigma2))) / (2 (1 + sigma2))``. With
    ``eta > 0`` and ``tau > 0``, ``p*_-`` is unstable and is the right edge of the
    basin of the collapsed fixed point ``p*_0 = 0``; ``p*_+`` is stable. With
    ``eta = 0``, ``p*_- = 0`` (a saddle-node) and ``p*_+ = tau / (1 + sigma2)``.

    Args:
        tau: EMA attenuation ``W_a = tau W`` (Assumption 1); 1 for SimSiam.
        eta: weight decay, >= 0.
        sigma2: augmentation variance (Assumption 2), >= 0.

    Returns:
        ``(p_minus, p_plus)``, or ``None`` when ``eta > tau^2 / (4 (1 + sigma2))``
        (only the collapsed fixed point exists, Obs #5).

    Raises:
        ValueError: if ``eta`` or ``sigma2`` is negative, or an argument is not finite.
        TypeError: if an argument is not a real number.

    Example:
        >>> fixed_points(1.0, 0.01, 0.0)
        (0.010102051443364402, 0.9898979485566356)
    """
    sigma2 = nonneg("sigma2", sigma2)
    return mode_fixed_points(tau, nonneg("eta", eta), 1.0 + sigma2, 1.0)


def mode_fixed_points(tau: float, eta: float, lambda_s: float,
                      lambda_d: float) -> tuple[float, float] | None:
    """Fixed points of the predictor weight for one eigenmode of general data (SM D.4).

    For a mode with ``Sigma^s`` eigenvalue ``lambda_s`` and ``Sigma^d`` eigenvalue
    ``lambda_d`` (SM Eqs. 102-104 plus weight decay ``eta``, on the invariant
    parabola ``w^2 = w_p^2 / alpha_p``), the non-collapsed fixed points solve
    ``w_p (tau lambda_d - lambda_s w_p) = eta``:
    ``(tau lambda_d pm sqrt(tau^2 lambda_d^2 - 4 eta lambda_s)) / (2 lambda_s)``.
    :func:`fixed_points` is the isotropic case ``lambda_s = 1 + sigma2, lambda_d = 1``.

    Returns:
        ``(p_minus, p_plus)`` or ``None`` when ``tau^2 lambda_d^2 < 4 eta lambda_s``.

    Raises:
        ValueError: if ``lambda_s <= 0``, or an argument is not finite.
        TypeError: if an argument is not a real number.
    """
    tau, eta, lambda_d = real("tau", tau), real("eta", eta), real("lambda_d", lambda_d)
    lambda_s = real("lambda_s", lambda_s)
    if lambda_s <= 0:
        raise ValueError(f"lambda_s must be a positive finite number, got {lambda_s!r}")
    disc = (tau * lambda_d) ** 2 - 4.0 * eta * lambda_s
    if disc < 0:
        return None
    root = math.sqrt(disc)
    return ((tau * lambda_d - root) / (2.0 * lambda_s),
            (tau * lambda_d + root) / (2.0 * lambda_s))


def mode_invariant(p: np.ndarray, s: np.ndarray, t: np.ndarray, *,
                   alpha_p: float = 1.0, eta: float = 0.0) -> np.ndarray:
    """The conserved ``c_j = exp(2 eta t) (s_j - p_j^2 / alpha_p)`` of Eqs. 11-12 (Eq. 14).

    Constant along any trajectory of Eqs. 11-12, whatever ``tau(t)`` does.

    Args:
        p: predictor eigenvalues, shape ``(T, ...)`` or broadcastable with ``t``.
        s: eigenvalues of ``F``, same shape as ``p``.
        t: times, shape ``(T,)`` (or a scalar).
    """
    p, s = np.asarray(p, dtype=np.float64), np.asarray(s, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    t = t.reshape(t.shape + (1,) * (p.ndim - t.ndim))
    return np.exp(2.0 * eta * t) * (s - p * p / alpha_p)


def invariant_matrix(W: np.ndarray, Wp: np.ndarray, t: np.ndarray | float, *,
                     alpha_p: float = 1.0, eta: float = 0.0) -> np.ndarray:
    """Theorem 1's conserved ``C = exp(2 eta t) (W W^T - alpha_p^{-1} W_p^T W_p)`` (Eq. 5).

    Constant under Eqs. 2-3 with stop-gradient for any ``W_a(t)``, ``X`` and ``X'``.

    Args:
        W: online weights, shape ``(..., n2, n1)``.
        Wp: predictor weights, shape ``(..., n2, n2)``.
        t: time(s), broadcastable to the leading dimensions.

    Returns:
        ``C`` with shape ``(..., n2, n2)``.
    """
    W, Wp = np.asarray(W, dtype=np.float64), np.asarray(Wp, dtype=np.float64)
    scale = np.exp(2.0 * eta * np.asarray(t, dtype=np.float64))[..., None, None]
    return scale * (W @ W.mT - Wp.mT @ Wp / alpha_p)


def K_matrix(F: np.ndarray, Wp: np.ndarray, tau: float | np.ndarray, *,
             alpha_p: float = 1.0, eta: float = 0.0, sigma2: float = 0.0) -> np.ndarray:
    """Theorem 3's ``K = (1+sigma2) [alpha_p F / 2 + W_p^2 - tau W_p / (1+sigma2)] + 3 eta I / 2`` (Eq. 9).

    Args:
        F: shape ``(..., d, d)``; Wp: symmetric, same shape; tau: scalar or ``(...)``.
    """
    F, Wp = np.asarray(F, dtype=np.float64), np.asarray(Wp, dtype=np.float64)
    tau = np.asarray(tau, dtype=np.float64)[..., None, None]
    eye = np.eye(F.shape[-1])
    return ((1.0 + sigma2) * (0.5 * alpha_p * F + Wp @ Wp) - tau * Wp
            + 1.5 * eta * eye)


def K_mode(p: np.ndarray, s: np.ndarray, tau: np.ndarray | float, *,
           alpha_p: float = 1.0, eta: float = 0.0, sigma2: float = 0.0) -> np.ndarray:
    """Eigenvalue of ``K`` (Eq. 9) on an aligned mode with ``W_p -> p_j``, ``F -> s_j``.

    Theorem 3's condition ``K > 0`` reads ``Delta_j < [alpha_p (1+sigma2) s_j + eta] / 2`` (Eq. 17).
    """
    p, s = np.asarray(p, dtype=np.float64), np.asarray(s, dtype=np.float64)
    return (1.0 + sigma2) * (0.5 * alpha_p * s + p * p) - tau * p + 1.5 * eta


def delta(p: np.ndarray, tau: np.ndarray | float, *, eta: float = 0.0,
          sigma2: float = 0.0) -> np.ndarray:
    """``Delta_j = p_j [tau - (1+sigma2) p_j] - eta`` (§3.2), so that Eq. 16 is ``dp/dt = p Delta``."""
    p = np.asarray(p, dtype=np.float64)
    return p * (tau - (1.0 + sigma2) * p) - eta


def commutator(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``[A, B] = A B - B A`` over the last two axes."""
    return A @ B - B @ A


def tau_closed_form(t: np.ndarray, p: np.ndarray, beta: float) -> np.ndarray:
    """Eq. 15: ``tau(t) = beta exp(-beta t) / p(t) * int_0^t p(t') exp(beta t') dt'``.

    The solution of Eq. 13 with ``tau(0) = 0`` on the invariant parabola
    ``s = p^2 / alpha_p`` (``c_j = 0``). The integral is the cumulative
    Simpson rule on the given samples (``scipy.integrate.cumulative_simpson``,
    error ``O(dt^4)`` for a smooth ``p``).

    Args:
        t: increasing sample times starting at 0, shape ``(T,)``.
        p: ``p_j(t)`` samples, shape ``(T, ...)``.
        beta: EMA rate of Eq. 4.

    Returns:
        ``tau(t)``, shape like ``p``.
    """
    t = np.asarray(t, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if t.ndim != 1 or t.shape[0] != p.shape[0]:
        raise ValueError(f"t must be 1-D with len(t) == p.shape[0]; got {t.shape} and {p.shape}")
    from scipy.integrate import cumulative_simpson   # lazy: keep the package import light

    tt = t.reshape(t.shape + (1,) * (p.ndim - 1))
    g = p * np.exp(beta * (tt - t[-1]))  # scaled by exp(-beta t_end) against overflow
    integral = cumulative_simpson(g, x=t, axis=0, initial=0.0)
    return beta * integral * np.exp(-beta * (tt - t[-1])) / p


def ema_tau(W: np.ndarray, Wa: np.ndarray) -> np.ndarray:
    """Least-squares ``tau`` in ``W_a ~ tau W`` (Assumption 1): ``<W_a, W> / <W, W>``.

    Args:
        W, Wa: shape ``(..., n2, n1)``; the last two axes are reduced.
    """
    return np.sum(Wa * W, axis=(-2, -1)) / np.sum(W * W, axis=(-2, -1))


def normalized_correlation(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Cosine ``<A, B>_F / (||A||_F ||B||_F)`` over the last two axes (SM Fig. 7's measure).

    NaN where ``A`` or ``B`` is zero (e.g. ``W_a(0) = 0``).
    """
    num = np.sum(A * B, axis=(-2, -1))
    den = np.sqrt(np.sum(A * A, axis=(-2, -1)) * np.sum(B * B, axis=(-2, -1)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den
