"""The theory of Tian, Chen & Ganguli (ICML 2021) as runnable NumPy code.

Modules (one job each):

* :mod:`~fastpred.theory.linear`: full linear BYOL/SimSiam gradient flow, Eqs. 2-4,
  with ablation switches (:class:`LinearConfig`).
* :mod:`~fastpred.theory.sgd`: the same model trained by finite-batch SGD.
* :mod:`~fastpred.theory.reduced`: ``W_p`` and ``F`` under Assumptions 1-3
  (Eq. 7 / SM Eq. 65; SM Eqs. 60-61 without symmetrization).
* :mod:`~fastpred.theory.decoupled`: per-mode dynamics, Eqs. 11-13 and SM Eqs. 102-104.
* :mod:`~fastpred.theory.analytic`: fixed points, invariants (Eqs. 5, 14), K(t)
  (Eq. 9), tau(t) (Eq. 15).
* :mod:`~fastpred.theory.data_models`: SM D.2 scrambling models.
* :mod:`~fastpred.theory.figures`: ``python -m fastpred.theory.figures --out DIR``.

Only NumPy is imported here (no torch, no matplotlib).
"""

from .analytic import (K_matrix, K_mode, collapse_threshold, commutator, delta,
                       ema_tau, fixed_points, invariant_matrix, mode_fixed_points,
                       mode_invariant, normalized_correlation, tau_closed_form)
from .data_models import (AdditiveScrambling, MultiplicativeScrambling, isotropic,
                          target_operator, top_left_eigenvectors)
from .decoupled import (ScalarTrajectory, decoupled_field, scalar_field,
                        simulate_decoupled, simulate_scalar, tau_rate)
from .linear import LinearConfig, LinearTrajectory, linear_field, simulate_linear
from .reduced import ReducedTrajectory, reduced_field, simulate_reduced
from .sgd import sgd_step, simulate_sgd

__all__ = [
    "AdditiveScrambling",
    "K_matrix",
    "K_mode",
    "LinearConfig",
    "LinearTrajectory",
    "MultiplicativeScrambling",
    "ReducedTrajectory",
    "ScalarTrajectory",
    "collapse_threshold",
    "commutator",
    "decoupled_field",
    "delta",
    "ema_tau",
    "fixed_points",
    "invariant_matrix",
    "isotropic",
    "linear_field",
    "mode_fixed_points",
    "mode_invariant",
    "normalized_correlation",
    "reduced_field",
    "scalar_field",
    "sgd_step",
    "simulate_decoupled",
    "simulate_linear",
    "simulate_reduced",
    "simulate_scalar",
    "simulate_sgd",
    "target_operator",
    "tau_closed_form",
    "tau_rate",
    "top_left_eigenvectors",
]
