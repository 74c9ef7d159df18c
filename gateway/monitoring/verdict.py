"""The band of a drift score (ok, watch, act, or insufficient samples): PSI against a bound
from its null distribution for the bin count and both sample sizes (docs/monitoring.md)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Final

# PSI bands: a moderate shift to watch, a shift to act on.
WATCH: Final = 0.1
ACT: Final = 0.25
# The chance that a version's report shows watch or act on data that did not change, for
# one evaluation: shared out among its scored features (Bonferroni).
FALSE_ALARM: Final = 0.01
# Below this many live values no band is given whatever the score (the chi-square
# approximation of the null distribution needs a few values per bin).
MIN_VALUES: Final = 20
BANDS: Final = ("ok", "watch", "act", "insufficient")

_NORMAL: Final = NormalDist()


@dataclass(frozen=True, slots=True)
class Verdict:
    """``bound``: the PSI that undrifted data exceeds with probability ``alpha`` at these
    sample sizes; ``needed``: live values for a band, when insufficient (None: the
    reference itself has too few rows for an act-sized shift to be told from noise)."""

    band: str
    bound: float | None
    needed: int | None


def chi2_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of the chi-square distribution with ``df`` degrees of freedom:
    exact for 1 and 2, else the Wilson-Hilferty cube approximation (within about 1 % for
    the upper tail used here)."""
    if df <= 1:
        return _NORMAL.inv_cdf((1.0 + p) / 2.0) ** 2
    if df == 2:
        return -2.0 * math.log(1.0 - p)
    z = _NORMAL.inv_cdf(p)
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


def degrees_of_freedom(reference: Sequence[float], live: Sequence[float]) -> int:
    """Bins that either side fills, less one: a bin empty on both sides adds no noise."""
    filled = sum(1 for r, q in zip(reference, live, strict=True) if r > 0 or q > 0)
    return max(1, filled - 1)


def needed_values(critical: float, reference_count: float) -> int | None:
    """The fewest live values whose noise bound is at most ACT (None: never, the
    reference's own noise is already above it)."""
    room = ACT / critical - 1.0 / reference_count
    return max(MIN_VALUES, math.ceil(1.0 / room)) if room > 0 else None


def verdict(psi: float | None, reference: Sequence[float], live: Sequence[float],
            tested: int, alpha: float = FALSE_ALARM) -> Verdict:
    """The band of a feature whose PSI is ``psi``, ``tested`` features of the version being
    banded together. Under no drift, n_eff * PSI is about chi-square with (bins - 1)
    degrees of freedom, 1 / n_eff = 1 / n_reference + 1 / n_live: a score above the
    ``alpha / tested`` quantile's bound is not noise. act and watch need both that and the
    band's size; ok needs enough values that an act-sized shift would clear the bound."""
    n_ref, n_live = float(sum(reference)), float(sum(live))
    if psi is None or n_ref <= 0:
        return Verdict("insufficient", None, None)
    critical = chi2_quantile(1.0 - alpha / max(1, tested), degrees_of_freedom(reference, live))
    needed = needed_values(critical, n_ref)
    if n_live < MIN_VALUES:
        return Verdict("insufficient", None, needed)
    bound = critical * (1.0 / n_ref + 1.0 / n_live)
    if psi >= max(ACT, bound):
        return Verdict("act", bound, None)
    if psi >= max(WATCH, bound):
        return Verdict("watch", bound, None)
    if bound <= ACT:
        return Verdict("ok", bound, None)
    return Verdict("insufficient", bound, needed)
