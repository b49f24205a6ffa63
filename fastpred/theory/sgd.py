"""Discrete-time, finite-batch SGD on the linear BYOL / SimSiam loss (Eq. 1).

The gradient flow of :mod:`fastpred.theory.linear` is the large-batch,
small-step limit of this process (Lemma 1): one step with learning rate
``lr`` (the paper's ``alpha``) is

* ``W   <- W   - lr (grad_W J_B + eta W)``,
* ``W_p <- W_p - lr (alpha_p grad_Wp J_B + eta W_p)``,
* ``W_a <- gamma_a W_a + (1 - gamma_a) W`` with ``1 - gamma_a = lr beta`` (§2),

where ``J_B = 1/(2B) sum_b ||W_p W x_1b - W_a x_2b||^2`` over a batch of pairs
of augmented views drawn from a data model (:mod:`fastpred.theory.data_models`).
"""

from __future__ import annotations

import numpy as np

from .linear import LinearConfig, LinearTrajectory

__all__ = ["sgd_step", "simulate_sgd"]


def sgd_step(W, Wp, Wa, x1, x2, cfg: LinearConfig, lr: float):
    """One SGD step on a batch of view pairs ``x1, x2`` of shape ``(B, n1)``.

    Returns:
        The new ``(W, W_p, W_a)``.
    """
    B = x1.shape[0]
    Wa_used = cfg.target_of(W, Wa)
    f1 = x1 @ W.T                                          # (B, n2) online features
    pred = f1 @ Wp.T if cfg.predictor else f1              # (B, n2)
    r = pred - x2 @ Wa_used.T                              # (B, n2) residual
    Wp_used = Wp if cfg.predictor else np.eye(W.shape[0])
    grad_W = Wp_used.T @ r.T @ x1 / B                      # (n2, n1)
    if not cfg.stop_grad:
        t = 1.0 if cfg.target == "online" else cfg.tau
        grad_W = grad_W - t * r.T @ x2 / B                 # gradient through W_a = t W
    W_new = W - lr * (grad_W + cfg.eta * W)
    if cfg.predictor:
        grad_Wp = r.T @ f1 / B                             # (n2, n2)
        if cfg.symmetric_predictor:
            grad_Wp = 0.5 * (grad_Wp + grad_Wp.T)
        Wp = Wp - lr * (cfg.alpha_p * grad_Wp + cfg.eta * Wp)
    if cfg.target == "ema":
        Wa = Wa + lr * cfg.beta * (W - Wa)
    return W_new, Wp, Wa


def simulate_sgd(model, W0: np.ndarray, cfg: LinearConfig, *, lr: float, steps: int,
                 batch_size: int, rng: np.random.Generator, Wp0: np.ndarray | None = None,
                 Wa0: np.ndarray | None = None, save_every: int = 1) -> LinearTrajectory:
    """Run ``steps`` SGD steps with fresh batches from ``model``.

    Args:
        model: a data model with ``sample(n, rng) -> (x1, x2)``.
        W0: ``W(0)`` ``(n2, n1)``; Wp0: ``W_p(0)`` (required with a predictor);
        Wa0: ``W_a(0)`` for an EMA target (default zeros).
        cfg: the ablation switches (as for the gradient flow).
        lr: learning rate ``alpha``; time ``t = lr * step`` matches the flow's.
        steps: number of steps; batch_size: pairs per step; rng: numpy Generator.
        save_every: keep every n-th step (the last is always kept).

    Returns:
        A :class:`~fastpred.theory.linear.LinearTrajectory` with ``t = lr * step``.

    Raises:
        ValueError: for non-positive ``lr``, ``steps``, ``batch_size``, ``save_every``
            or a missing ``Wp0``.
    """
    for name, v in (("lr", lr), ("steps", steps), ("batch_size", batch_size),
                    ("save_every", save_every)):
        if not v > 0:
            raise ValueError(f"{name} must be positive, got {v!r}")
    W = np.array(W0, dtype=np.float64)
    n2 = W.shape[0]
    if cfg.predictor and Wp0 is None:
        raise ValueError("Wp0 is required when cfg.predictor is True")
    Wp = np.eye(n2) if not cfg.predictor else np.array(Wp0, dtype=np.float64)
    Wa = np.zeros_like(W) if Wa0 is None else np.array(Wa0, dtype=np.float64)
    kept = [k for k in range(0, steps + 1, save_every)]
    if kept[-1] != steps:
        kept.append(steps)
    Ws, Wps, Was = [W], [Wp], [cfg.target_of(W, Wa)]
    for k in range(1, steps + 1):
        x1, x2 = model.sample(batch_size, rng)
        W, Wp, Wa = sgd_step(W, Wp, Wa, x1, x2, cfg, lr)
        if k in kept[len(Ws):len(Ws) + 1]:
            Ws.append(W)
            Wps.append(Wp)
            Was.append(cfg.target_of(W, Wa))
    return LinearTrajectory(lr * np.asarray(kept, dtype=np.float64), np.stack(Ws),
                            np.stack(Wps), np.stack(Was))
