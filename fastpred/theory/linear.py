"""Full linear BYOL / SimSiam gradient flow, Eqs. 2-4 (SM Eqs. 37-38, 50, 55).

Online ``W`` (n2 x n1), predictor ``W_p`` (n2 x n2), target ``W_a`` (n2 x n1);
``X = E[xbar xbar^T]`` and ``X' = E[Var(x'|x)]`` (Lemma 1). With
``G := -W_p W (X + X') + W_a X`` the flow is

* ``dW_p/dt = alpha_p G W^T - eta W_p``  (Eq. 2),
* ``dW/dt   = W_p^T G - eta W``          (Eq. 3, stop-gradient on the target),
* ``dW_a/dt = beta (W - W_a)``           (Eq. 4).

:class:`LinearConfig` switches between the paper's ablations. All functions
accept stacks of independent systems (leading batch axes) and work in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._integrate import rk4

__all__ = ["LinearConfig", "LinearTrajectory", "linear_field", "simulate_linear"]

_TARGETS = ("ema", "online", "scaled")


@dataclass(frozen=True)
class LinearConfig:
    """Switches and rates of the linear dynamics (Lemma 1 and its ablations).

    Attributes:
        alpha_p: predictor learning-rate ratio ``alpha_p`` (Eq. 2).
        eta: weight decay ``eta`` on ``W`` and ``W_p`` (Eqs. 2-3).
        target: ``"ema"``: ``W_a`` follows Eq. 4 (BYOL); ``"online"``:
            ``W_a = W`` (SimSiam, Eq. 4 ignored); ``"scaled"``: ``W_a = tau W``
            with a fixed ``tau`` (Assumption 1 at frozen ``tau``, SM Eq. 60).
        beta: EMA rate of Eq. 4; required for ``target="ema"``.
        tau: the factor of ``target="scaled"``.
        stop_grad: stop-gradient on the target branch. ``False`` adds the
            gradient through ``W_a = tau W`` (SM Eq. 50 for ``tau = 1``); not
            defined for an EMA target, which no gradient reaches.
        predictor: ``False`` pins ``W_p = I`` (no predictor, SM Eq. 55, SM D.3).
        symmetric_predictor: Assumption 3: the ``W_p`` flow is symmetrized,
            ``(dW_p + dW_p^T) / 2``; ``W_p(0)`` must then be symmetric.
    """

    alpha_p: float = 1.0
    eta: float = 0.0
    target: str = "ema"
    beta: float | None = None
    tau: float = 1.0
    stop_grad: bool = True
    predictor: bool = True
    symmetric_predictor: bool = False

    def __post_init__(self) -> None:
        if self.target not in _TARGETS:
            raise ValueError(f"target must be one of {_TARGETS}, got {self.target!r}")
        if self.target == "ema":
            if self.beta is None or not (np.isfinite(self.beta) and self.beta >= 0):
                raise ValueError(f"target='ema' needs beta >= 0 (Eq. 4), got beta={self.beta!r}")
            if not self.stop_grad:
                raise ValueError("stop_grad=False needs target='online' or 'scaled': "
                                 "no gradient reaches an EMA target")
        if not np.isfinite(self.alpha_p) or self.alpha_p <= 0:
            raise ValueError(f"alpha_p must be a positive finite number, got {self.alpha_p!r}")
        if not np.isfinite(self.eta) or self.eta < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {self.eta!r}")

    def target_of(self, W: np.ndarray, Wa: np.ndarray) -> np.ndarray:
        """The target weights ``W_a`` used in ``G`` for the current state."""
        if self.target == "online":
            return W
        if self.target == "scaled":
            return self.tau * W
        return Wa


@dataclass(frozen=True)
class LinearTrajectory:
    """Saved states: ``t`` ``(T,)``; ``W``, ``Wa`` ``(T, ..., n2, n1)``; ``Wp`` ``(T, ..., n2, n2)``.

    ``Wa`` is the target actually used (``W`` or ``tau W`` unless ``target="ema"``).
    """

    t: np.ndarray
    W: np.ndarray
    Wp: np.ndarray
    Wa: np.ndarray


def linear_field(W: np.ndarray, Wp: np.ndarray, Wa: np.ndarray, X: np.ndarray,
                 Xp: np.ndarray, cfg: LinearConfig):
    """Time derivatives ``(dW, dW_p, dW_a)`` of Eqs. 2-4 under ``cfg``.

    Args:
        W: ``(..., n2, n1)``; Wp: ``(..., n2, n2)``; Wa: ``(..., n2, n1)`` (used
            only for ``target="ema"``); X, Xp: ``(n1, n1)`` symmetric PSD.
    """
    S = X + Xp                                             # (n1, n1) = Sigma^s
    Wa = cfg.target_of(W, Wa)
    if not cfg.predictor:
        Wp = np.broadcast_to(np.eye(W.shape[-2]), W.shape[:-2] + (W.shape[-2],) * 2)
    G = -Wp @ W @ S + Wa @ X                               # (..., n2, n1)
    if cfg.stop_grad:
        dW = Wp.mT @ G - cfg.eta * W                       # Eq. 3
    else:
        # -dJ/dW with the gradient also flowing through W_a = tau W
        # (tau = 1: SM Eq. 50): J = 1/2 tr(Wp W S W^T Wp^T) - tau tr(Wp W X W^T)
        # + tau^2/2 tr(W S W^T).
        t = 1.0 if cfg.target == "online" else cfg.tau
        dW = (-Wp.mT @ Wp @ W @ S + t * (Wp + Wp.mT) @ W @ X - t * t * W @ S
              - cfg.eta * W)
    if cfg.predictor:
        dWp = cfg.alpha_p * G @ W.mT - cfg.eta * Wp        # Eq. 2
        if cfg.symmetric_predictor:
            dWp = 0.5 * (dWp + dWp.mT)                     # Assumption 3
    else:
        dWp = np.zeros_like(Wp)
    dWa = cfg.beta * (W - Wa) if cfg.target == "ema" else np.zeros_like(W)   # Eq. 4
    return dW, dWp, dWa


def _check_square(name: str, A: np.ndarray, n: int) -> None:
    if A.shape != (n, n):
        raise ValueError(f"{name} must have shape ({n}, {n}), got {A.shape}")


def simulate_linear(W0: np.ndarray, X: np.ndarray, Xp: np.ndarray, cfg: LinearConfig, *,
                    Wp0: np.ndarray | None = None, Wa0: np.ndarray | None = None,
                    t_end: float, dt: float, save_every: int = 1) -> LinearTrajectory:
    """Integrate the full linear dynamics (Eqs. 2-4 with ``cfg``'s switches) by RK4.

    Args:
        W0: ``W(0)``, shape ``(..., n2, n1)`` (leading axes: independent runs).
        X, Xp: ``X`` and ``X'`` of Lemma 1, shape ``(n1, n1)``; for a data
            model use ``model.X`` and ``model.X_prime``
            (:mod:`fastpred.theory.data_models`).
        cfg: the ablation switches.
        Wp0: ``W_p(0)`` ``(..., n2, n2)``; required with a predictor, ignored
            without (``W_p = I``).
        Wa0: ``W_a(0)`` for ``target="ema"``; defaults to zeros, the paper's
            choice (SM Fig. 7 caption).
        t_end, dt, save_every: see :func:`fastpred.theory._integrate.rk4`.

    Returns:
        A :class:`LinearTrajectory`.

    Raises:
        ValueError: on inconsistent shapes, a missing ``Wp0``, or a
            non-symmetric ``Wp0`` with ``symmetric_predictor=True``.
    """
    W0 = np.asarray(W0, dtype=np.float64)
    n2, n1 = W0.shape[-2:]
    X, Xp = np.asarray(X, dtype=np.float64), np.asarray(Xp, dtype=np.float64)
    _check_square("X", X, n1)
    _check_square("Xp", Xp, n1)
    if cfg.predictor:
        if Wp0 is None:
            raise ValueError("Wp0 is required when cfg.predictor is True")
        Wp0 = np.broadcast_to(np.asarray(Wp0, dtype=np.float64), W0.shape[:-2] + (n2, n2))
        if cfg.symmetric_predictor and not np.allclose(Wp0, Wp0.mT, rtol=0, atol=1e-12):
            raise ValueError("symmetric_predictor=True needs a symmetric Wp0 (Assumption 3)")
    else:
        Wp0 = np.broadcast_to(np.eye(n2), W0.shape[:-2] + (n2, n2))
    Wa0 = np.zeros_like(W0) if Wa0 is None else np.broadcast_to(
        np.asarray(Wa0, dtype=np.float64), W0.shape)

    def field(_t, y):
        return linear_field(y[0], y[1], y[2], X, Xp, cfg)

    t, (W, Wp, Wa) = rk4(field, (W0, Wp0, Wa0), t_end, dt, save_every)
    if cfg.target != "ema":
        Wa = cfg.target_of(W, Wa)
    return LinearTrajectory(t, W, Wp, Wa)
