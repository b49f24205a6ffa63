"""train.paired: the Student t critical values against the printed t table, the paired interval on
hand-computed differences, the sign count, and what the seeds of only one row become."""

import math

import pytest

from train import paired

# two-sided 95 % and 90 % critical values as printed in t tables (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2)
T_TABLE_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262, 29: 2.045}
T_TABLE_90 = {2: 2.920, 4: 2.132}


def test_t_quantile_matches_the_printed_table():
    for dof, t in T_TABLE_95.items():
        assert paired.t_quantile(0.95, dof) == pytest.approx(t, abs=6e-4)
    for dof, t in T_TABLE_90.items():
        assert paired.t_quantile(0.90, dof) == pytest.approx(t, abs=6e-4)


@pytest.mark.parametrize("level, dof, match", [(1.0, 2, "level"), (0.0, 2, "level"), (0.95, 0, "dof"),
                                               (0.95, 2.0, "dof"), (0.95, True, "dof")])
def test_t_quantile_refuses_bad_arguments(level, dof, match):
    with pytest.raises(ValueError, match=match):
        paired.t_quantile(level, dof)


def test_interval_of_1_2_3_is_2_pm_2_484():
    """Differences [1, 2, 3]: mean 2, sd 1, t_{0.975,2} = 4.303 -> 2 ± 4.303 / sqrt(3) = 2 ± 2.484."""
    p = paired.pair({0: 11.0, 1: 12.0, 2: 13.0}, {0: 10.0, 1: 10.0, 2: 10.0})
    assert p.diffs == (1.0, 2.0, 3.0) and p.mean == 2.0 and p.sd == 1.0
    assert p.half_width() == pytest.approx(2.484, abs=1e-3)
    lo, hi = p.interval()
    assert (lo, hi) == pytest.approx((2 - 2.484, 2 + 2.484), abs=1e-3)
    assert paired.directional(p, +1) == "undecided"  # the interval contains 0
    assert paired.equivalent(p, 1.0) == "undecided"


def test_five_seeds_hand_computed():
    """d = 0.5, 1.5, -0.5, 2.5, 1.0: mean 1.0, sum of squared deviations 0.25+0.25+2.25+2.25+0 = 5,
    sd = sqrt(5/4) = 1.1180, t_{0.975,4} = 2.776 -> half-width 2.776 * 1.1180 / sqrt(5) = 1.388."""
    p = paired.pair(dict(enumerate([80.5, 81.5, 79.5, 82.5, 81.0])), dict(enumerate([80.0] * 5)))
    assert p.mean == pytest.approx(1.0) and p.sd == pytest.approx(math.sqrt(1.25))
    assert p.half_width() == pytest.approx(1.388, abs=1e-3)
    assert p.agreeing(+1) == 4 and p.agreeing(-1) == 1
    assert p.within(1.0) == 3  # 0.5, -0.5, 1.0 (the margin itself counts as within)


def test_sign_count_leaves_ties_out():
    p = paired.pair({0: 1.0, 1: 2.0, 2: 2.0, 3: 0.0}, {0: 2.0, 1: 2.0, 2: 1.0, 3: 0.0})
    assert p.diffs == (-1.0, 0.0, 1.0, 0.0)
    assert (p.agreeing(+1), p.agreeing(-1)) == (1, 1)
    with pytest.raises(ValueError, match="sign"):
        p.agreeing(0)


def test_seeds_of_one_row_only_are_left_out_and_listed():
    p = paired.pair({0: 5.0, 1: 6.0, 3: 7.0, 4: 1.0}, {0: 4.0, 1: 4.0, 2: 9.0, 3: 4.0})
    assert p.seeds == (0, 1, 3) and p.diffs == (1.0, 2.0, 3.0)
    assert (p.only_a, p.only_b) == ((4,), (2,))
    assert p.half_width() == pytest.approx(2.484, abs=1e-3)  # the same [1, 2, 3] as above


def test_fewer_than_2_pairs_have_no_interval():
    one = paired.pair({0: 3.0}, {0: 1.0})
    assert one.n == 1 and one.mean == 2.0 and math.isnan(one.half_width()) and math.isnan(one.sd)
    none = paired.pair({0: 3.0}, {1: 1.0})
    assert none.n == 0 and math.isnan(none.mean) and (none.only_a, none.only_b) == ((0,), (1,))


def test_directional_and_equivalence_rules():
    above = paired.pair(dict(enumerate([3.0, 4.0, 5.0])), dict(enumerate([0.0] * 3)))  # 4 ± 2.484
    assert paired.directional(above, +1) == "holds" and paired.directional(above, -1) == "contradicted"
    assert paired.equivalent(above, 1.0) == "contradicted"  # [1.52, 6.48] lies wholly above +1
    assert paired.equivalent(above, 7.0) == "holds"
    tight = paired.pair(dict(enumerate([0.1, -0.1, 0.0])), dict(enumerate([0.0] * 3)))  # 0 ± 0.248
    assert paired.equivalent(tight, 1.0) == "holds" and paired.directional(tight, +1) == "undecided"
