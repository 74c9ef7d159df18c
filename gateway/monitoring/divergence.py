"""The drift scores between two histograms over the same bins: Population Stability Index,
Jensen-Shannon distance and the Kolmogorov-Smirnov statistic (docs/monitoring.md: formulas)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

# Added to every bin's count before PSI and JS: an empty bin on one side would otherwise
# make PSI infinite. Half a row per bin (Jeffreys' prior) moves scores of a few hundred
# rows by far less than the 0.1 watch band.
SMOOTHING: Final = 0.5

Counts = Sequence[float] | npt.NDArray[np.float64]


def _shares(counts: Counts, smoothing: float) -> npt.NDArray[np.float64]:
    values = np.asarray(counts, dtype=np.float64) + smoothing
    total = float(values.sum())
    return values / total if total > 0 else values


def psi(reference: Counts, live: Counts) -> float:
    """PSI = sum_i (q_i - p_i) * ln(q_i / p_i) over smoothed shares p (reference) and
    q (live). 0 for identical shares; symmetric in its arguments."""
    p = _shares(reference, SMOOTHING)
    q = _shares(live, SMOOTHING)
    return float(np.sum((q - p) * np.log(q / p)))


def js_distance(reference: Counts, live: Counts) -> float:
    """Jensen-Shannon distance, base 2, in [0, 1]: sqrt of the mean KL divergence of p and q
    from their midpoint m = (p + q) / 2, over smoothed shares."""
    p = _shares(reference, SMOOTHING)
    q = _shares(live, SMOOTHING)
    m = (p + q) / 2
    divergence = 0.5 * float(np.sum(p * np.log2(p / m))) + 0.5 * float(np.sum(q * np.log2(q / m)))
    return math.sqrt(max(divergence, 0.0))


def ks(reference: Counts, live: Counts) -> float:
    """Kolmogorov-Smirnov statistic from histograms: the largest gap between the two
    cumulative shares at the bin edges (no smoothing; 0 when either side is empty). For
    categorical features it depends on the category order; it is reported, not alerted on."""
    p = np.asarray(reference, dtype=np.float64)
    q = np.asarray(live, dtype=np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        return 0.0
    return float(np.max(np.abs(np.cumsum(p) / p.sum() - np.cumsum(q) / q.sum())))


def scores(reference: Counts, live: Counts) -> dict[str, float]:
    """Every method's score, by the name the metrics and the JSON use."""
    return {"psi": psi(reference, live), "js": js_distance(reference, live),
            "ks": ks(reference, live)}
