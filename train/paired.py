"""Paired per-seed differences between two rows of a study, and what they decide.

In a study every seed fixes the initial network, the order of the pre-training data and the
linear evaluation's held-out split in every row, so two rows' results for one seed differ by the
setting alone plus the run's own noise. Their per-seed differences ``d_s = a_s - b_s`` are
therefore compared directly (a paired t interval), which removes the seed-to-seed spread both
rows share; the unpaired mean ± std of each row keeps it.

The interval is Student's: ``mean(d) ± t_{1-(1-level)/2, n-1} · sd(d) / sqrt(n)`` with the
sample standard deviation ``sd`` (n - 1 in the denominator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy.stats import t as student_t

LEVEL = 0.95  # two-sided confidence level of the reported intervals
MIN_PAIRS = 3  # fewer paired seeds decide nothing by the paired rule (with 2, t_{0.975,1} = 12.7)


@dataclass(frozen=True)
class PairedDiff:
    """Per-seed differences ``a - b`` over the seeds both rows finished.

    Attributes:
        seeds: the paired seeds, ascending.
        diffs: ``a_s - b_s`` for each of them.
        only_a: seeds finished in ``a`` alone (left out of the pairing).
        only_b: seeds finished in ``b`` alone (left out of the pairing).
    """

    seeds: tuple[int, ...]
    diffs: tuple[float, ...]
    only_a: tuple[int, ...] = ()
    only_b: tuple[int, ...] = ()

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def mean(self) -> float:
        return sum(self.diffs) / self.n if self.n else math.nan

    @property
    def sd(self) -> float:
        """Sample standard deviation of the differences (nan below 2 pairs)."""
        if self.n < 2:
            return math.nan
        m = self.mean
        return math.sqrt(sum((d - m) ** 2 for d in self.diffs) / (self.n - 1))

    def half_width(self, level: float = LEVEL) -> float:
        """Half-width of the two-sided Student t interval of the mean difference (nan below 2 pairs)."""
        if self.n < 2:
            return math.nan
        return t_quantile(level, self.n - 1) * self.sd / math.sqrt(self.n)

    def interval(self, level: float = LEVEL) -> tuple[float, float]:
        h = self.half_width(level)
        return self.mean - h, self.mean + h

    def agreeing(self, sign: int) -> int:
        """How many differences have the sign ``sign`` (+1 or -1) strictly; a tie agrees with neither."""
        if sign not in (1, -1):
            raise ValueError(f"sign={sign!r}: expected +1 or -1")
        return sum(1 for d in self.diffs if d * sign > 0)

    def within(self, margin: float) -> int:
        """How many differences are no larger than ``margin`` in absolute value."""
        return sum(1 for d in self.diffs if abs(d) <= margin)


def t_quantile(level: float, dof: int) -> float:
    """The two-sided Student t critical value: ``t_{1-(1-level)/2, dof}`` (4.303 for 95 %, 2 dof)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level!r}: expected a number strictly between 0 and 1")
    if isinstance(dof, bool) or not isinstance(dof, int) or dof < 1:
        raise ValueError(f"dof={dof!r}: expected a whole number >= 1")
    return float(student_t.ppf(1.0 - (1.0 - level) / 2.0, dof))


def pair(a: dict[int, float], b: dict[int, float]) -> PairedDiff:
    """The per-seed differences ``a[s] - b[s]`` over the seeds in both; the others are listed apart."""
    both = sorted(set(a) & set(b))
    return PairedDiff(seeds=tuple(both), diffs=tuple(a[s] - b[s] for s in both),
                      only_a=tuple(sorted(set(a) - set(b))), only_b=tuple(sorted(set(b) - set(a))))


def directional(p: PairedDiff, sign: int, level: float = LEVEL) -> str:
    """``holds`` when the interval excludes 0 on the side ``sign`` (+1: a above b, -1: a below b),
    ``contradicted`` when it excludes 0 on the other side, ``undecided`` otherwise."""
    lo, hi = (x * sign for x in p.interval(level))
    lo, hi = min(lo, hi), max(lo, hi)
    if lo > 0:
        return "holds"
    if hi < 0:
        return "contradicted"
    return "undecided"


def equivalent(p: PairedDiff, margin: float, level: float = LEVEL) -> str:
    """An equivalence claim with the margin ``margin``: ``holds`` when the whole interval lies
    within ``[-margin, margin]``, ``contradicted`` when it lies wholly outside it (beyond one end),
    ``undecided`` otherwise (the two one-sided tests, each here at (1 - level) / 2, so conservative)."""
    lo, hi = p.interval(level)
    if -margin <= lo and hi <= margin:
        return "holds"
    if lo > margin or hi < -margin:
        return "contradicted"
    return "undecided"
