"""Argument checks shared by the theory modules: one ``ValueError`` / ``TypeError`` line naming the
argument and its value."""

from __future__ import annotations

import math
import numbers


def real(name: str, value: object) -> float:
    """``value`` as a finite float.

    Raises:
        TypeError: ``value`` is not a real number (a string, a bool, an array).
        ValueError: ``value`` is NaN or infinite.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return v


def nonneg(name: str, value: object) -> float:
    """``value`` as a finite float >= 0 (:func:`real`, then the sign)."""
    v = real(name, value)
    if v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def count(name: str, value: object, low: int, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]`` (no upper bound when ``high`` is None).

    Raises:
        TypeError: ``value`` is not an integer (a float, a bool, a string).
        ValueError: ``value`` is out of range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return int(value)
