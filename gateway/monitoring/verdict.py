"""The band of a drift score (ok, watch, act, or insufficient samples): PSI against a bound
from its null distribution for the bin count and both sample sizes (docs/monitoring.md)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class Verdict:
    """``bound``: the PSI that undrifted data exceeds with probability ``alpha / tested`` at
    these sample sizes; ``p_value``: the chance that undrifted data scores at least this
    PSI (one feature alone); ``needed``: live values for a band, when insufficient (None:
    the reference itself has too few rows for an act-sized shift to be told from noise)."""

    band: str
    bound: float | None
    needed: int | None
    p_value: float | None = None


def chi2_survival(x: float, df: int) -> float:
    """P(X > x) for X chi-square with ``df`` degrees of freedom: the regularized upper
    incomplete gamma function Q(df/2, x/2), by its series below a + 1 and its continued
    fraction above (both converge fast there)."""
    a, y = df / 2.0, x / 2.0
    if y <= 0.0:
        return 1.0
    scale = math.exp(-y + a * math.log(y) - math.lgamma(a))
    if y < a + 1.0:
        term = total = 1.0 / a
        n = a
        for _ in range(1000):
            n += 1.0
            term *= y / n
            total += term
            if term < total * 1e-15:
                break
        return max(0.0, 1.0 - total * scale)
    tiny = 1e-300
    b = y + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = d if abs(d) > tiny else tiny
        c = b + an / c
        c = c if abs(c) > tiny else tiny
        d = 1.0 / d
        h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return scale * h


@functools.lru_cache(maxsize=4096)
def chi2_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of the chi-square distribution with ``df`` degrees of freedom, by
    bisection on chi2_survival (a report asks for few distinct ones: cached)."""
    tail = 1.0 - p
    low, high = 0.0, float(df) + 10.0
    while chi2_survival(high, df) > tail:
        high *= 2.0
    for _ in range(100):
        middle = (low + high) / 2.0
        if chi2_survival(middle, df) > tail:
            low = middle
        else:
            high = middle
        if high - low < 1e-9 * high:
            break
    return (low + high) / 2.0


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
    df = degrees_of_freedom(reference, live)
    critical = chi2_quantile(1.0 - alpha / max(1, tested), df)
    needed = needed_values(critical, n_ref)
    if n_live < MIN_VALUES:
        return Verdict("insufficient", None, needed)
    spread = 1.0 / n_ref + 1.0 / n_live
    bound = critical * spread
    p_value = chi2_survival(psi / spread, df)
    if psi >= max(ACT, bound):
        return Verdict("act", bound, None, p_value)
    if psi >= max(WATCH, bound):
        return Verdict("watch", bound, None, p_value)
    if bound <= ACT:
        return Verdict("ok", bound, None, p_value)
    return Verdict("insufficient", bound, needed, p_value)
