"""The eigenvalue map of Eq. 18 as one value: its four settings, checked once, and its formula.

``W_p = U diag(p) U^T`` with ``p = g(s)`` for the eigenvalues ``s`` of F. An
:class:`EigMap` holds the settings of ``g`` (eps, power, eps mode, min_eig), made
and validated once where a user's arguments come in (``DirectPredictor``,
``functional.eig_map`` / ``directpred_weight``) and then passed whole through the
solvers and backends. Calling it applies the map in plain PyTorch: the reference
every kernel (Triton, C++, CUDA) is tested against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

EPS_MODES = ("relative", "absolute")


@dataclass(frozen=True)
class EigMap:
    """The eigenvalue map p = g(s) of Eq. 18, in both forms.

    ``relative`` (default; the authors' ``boost_scale``, which produced the paper's tables):
        p = (max(s, 0) / max_j s_j) ** power + eps, then p = max(p, min_eig).
    ``absolute`` (Eq. 18 as printed, with power 1/2):
        p = max(s, 0) ** power + eps * max_j s_j.

    ``power=0.5`` is DirectPred, ``power=1`` DirectCopy-style. A matrix whose largest
    eigenvalue is not positive (F all zeros, say) maps to ``p = max(eps, min_eig)``
    everywhere in relative mode (W_p = that multiple of I) and to ``p = 0`` in absolute
    mode: always finite.

    Raises:
        TypeError: eps, power or min_eig is not a real number.
        ValueError: one of them is not finite, ``power <= 0``, ``eps < 0``, or ``eps_mode`` is not
            one of :data:`EPS_MODES`; the message names the argument.
    """

    eps: float = 0.1
    power: float = 0.5
    eps_mode: str = "relative"
    min_eig: float = 1e-4

    def __post_init__(self) -> None:
        for name in ("eps", "power", "min_eig"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a real number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not self.power > 0:
            raise ValueError(f"power must be > 0, got {self.power!r}")
        if self.eps < 0:
            # A negative boost gives W_p = min_eig I (relative) or a negative-definite W_p (absolute).
            raise ValueError(f"eps must be >= 0 (the eigenvalue boost of Eq. 18), got {self.eps!r}")
        if self.eps_mode not in EPS_MODES:
            raise ValueError(f"eps_mode must be one of {EPS_MODES}, got {self.eps_mode!r}")

    @property
    def relative(self) -> bool:
        """``eps_mode == "relative"``."""
        return self.eps_mode == "relative"

    @property
    def has_closed_form(self) -> bool:
        """Whether ``W_p = F / s_max + eps I`` exactly for a PSD F (DirectCopy; docs/design.md,
        "DirectCopy's closed form"): power 1 in relative mode with ``eps >= min_eig`` (the clamp to
        min_eig then never acts, as s / s_max >= 0)."""
        return self.power == 1 and self.relative and self.eps >= self.min_eig

    def __call__(self, s: Tensor) -> Tensor:
        """p = g(s) for eigenvalues ``s`` ``(..., d)`` (any order), ``(..., d)``."""
        s = s.clamp(min=0)
        s_max = s.amax(dim=-1, keepdim=True)  # (..., 1)
        if self.relative:
            # Where s_max == 0 every s is 0: divide by 1 instead of 0 to stay finite.
            ratio = s / torch.where(s_max > 0, s_max, torch.ones_like(s_max))
            return (ratio.pow(self.power) + self.eps).clamp(min=self.min_eig)
        return s.pow(self.power) + self.eps * s_max
