"""The verdict rule: its chi-square quantiles against scipy's, and each band's conditions."""

from __future__ import annotations

import pytest
from scipy.stats import chi2

from gateway.monitoring.divergence import psi
from gateway.monitoring.verdict import ACT, chi2_quantile, chi2_survival, needed_values, verdict


@pytest.mark.parametrize("df", [1, 2, 3, 5, 9, 20, 63])
@pytest.mark.parametrize("p", [0.99, 0.999, 0.9999, 0.99999])
def test_chi_square_quantiles_and_tails_match_scipys(df: int, p: float) -> None:
    assert chi2_quantile(p, df) == pytest.approx(chi2.ppf(p, df), rel=1e-6)
    x = chi2.ppf(p, df)
    assert chi2_survival(x, df) == pytest.approx(1 - p, rel=1e-6)
    assert chi2_survival(df / 3, df) == pytest.approx(chi2.sf(df / 3, df), rel=1e-9)


REFERENCE = [100.0] * 10


def test_the_same_shares_are_ok_once_an_act_sized_shift_would_clear_the_bound() -> None:
    live = [30.0] * 10
    found = verdict(psi(REFERENCE, live), REFERENCE, live, tested=10)
    assert found.band == "ok" and found.bound is not None and found.bound <= ACT


def test_too_few_values_are_insufficient_with_the_count_needed() -> None:
    live = [2.0] * 10
    found = verdict(psi(REFERENCE, live), REFERENCE, live, tested=10)
    assert found.band == "insufficient"
    assert found.needed is not None and found.needed > 20
    # At the count named, the same shares are ok.
    enough = [found.needed / 10] * 10
    assert verdict(psi(REFERENCE, enough), REFERENCE, enough, tested=10).band == "ok"


def test_a_large_shift_is_act_before_the_count_needed_and_a_small_one_is_not() -> None:
    moved = [0.0] * 8 + [20.0, 20.0]  # 40 values, all in the two top bins
    assert verdict(psi(REFERENCE, moved), REFERENCE, moved, tested=10).band == "act"
    mild = [3.0] * 8 + [8.0, 8.0]
    assert verdict(psi(REFERENCE, mild), REFERENCE, mild, tested=10).band == "insufficient"


def test_a_reference_too_small_for_an_act_sized_shift_never_has_enough() -> None:
    assert needed_values(critical=40.0, reference_count=100.0) is None
    small = [2.0] * 10
    found = verdict(psi(small, small), small, small, tested=10)
    assert found.band == "insufficient" and found.needed is None
