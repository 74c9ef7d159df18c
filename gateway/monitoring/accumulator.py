"""Statistics of one tensor's features over some rows: per numeric feature count, sums,
min, max, NaN/inf counts and a histogram on the profile's cuts; per categorical feature the
count of each category. Updated from arrays in a few vectorised numpy calls; mergeable."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from gateway.monitoring.profile import (
    CategoricalFeature,
    Layout,
    NumericFeature,
    NumericReference,
    TensorProfile,
)
from runtimes.base import Tensor

Floats = npt.NDArray[np.float64]
# Numeric values handled per update, to bound the temporary comparison matrix.
_CHUNK_VALUES: Final = 1 << 20
# A value up to this many float32 ulps above a cut counts as on it (the bin below, where
# the reference's values at the cut went): the same model run with other threads or
# another build differs in the last bits, and a probability of 1.0000001 must not land
# in a bin past the reference's 1.0.
EDGE_ULPS: Final = 4


class ShapeMismatch(Exception):
    """A tensor's live shape does not fit its profile (a different number of features)."""


def feature_matrix(array: Tensor, layout: Layout) -> Floats:
    """[values, features] float64 of a batched tensor: one column per feature of the tensor's
    second axis (columns), per channel of axis 1 over the other axes (channels), or one
    feature over every element (tensor)."""
    data = np.asarray(array)
    if data.dtype.kind not in "biuf":
        raise ShapeMismatch(f"dtype {data.dtype} is not numeric")
    floats: Floats = data.astype(np.float64, copy=False)
    rows = floats.shape[0] if floats.ndim else 1
    if layout == "tensor" or floats.ndim <= 1:
        return floats.reshape(-1, 1)
    if layout == "channels" and floats.ndim >= 3:
        channels = floats.shape[1]
        return np.moveaxis(floats.reshape(rows, channels, -1), 1, 2).reshape(-1, channels)
    return floats.reshape(rows, -1)


def default_layout(rank: int) -> Layout:
    """Columns for [batch, features]; per channel (axis 1) for images and other rank >= 3."""
    return "channels" if rank >= 3 else "columns"


@dataclass(slots=True)
class TensorStats:
    """Numeric arrays over the tensor's F numeric features (``hist`` is [F, max bins]) and
    one count array per categorical feature."""

    count: Floats
    total: Floats
    squares: Floats
    low: Floats
    high: Floats
    nan: Floats
    inf: Floats
    hist: Floats
    categories: list[Floats]
    rows: int = 0

    def merge(self, other: TensorStats) -> None:
        self.count += other.count
        self.total += other.total
        self.squares += other.squares
        np.minimum(self.low, other.low, out=self.low)
        np.maximum(self.high, other.high, out=self.high)
        self.nan += other.nan
        self.inf += other.inf
        self.hist += other.hist
        for index, theirs in enumerate(other.categories):
            self.categories[index] += theirs
        self.rows += other.rows

    def copy(self) -> TensorStats:
        return TensorStats(
            self.count.copy(), self.total.copy(), self.squares.copy(), self.low.copy(),
            self.high.copy(), self.nan.copy(), self.inf.copy(), self.hist.copy(),
            [c.copy() for c in self.categories], self.rows,
        )

    def numeric_summary(self, index: int, bins: int) -> NumericReference:
        """Feature ``index``'s figures as a reference (what freezing a window keeps)."""
        n = float(self.count[index])
        mean = float(self.total[index]) / n if n else 0.0
        variance = float(self.squares[index]) / n - mean * mean if n else 0.0
        return NumericReference(
            count=int(n), mean=mean, std=math.sqrt(max(variance, 0.0)),
            min=float(self.low[index]) if n else 0.0,
            max=float(self.high[index]) if n else 0.0,
            nan=int(self.nan[index]), inf=int(self.inf[index]),
            counts=tuple(float(c) for c in self.hist[index, :bins]),
        )


def tolerant_cuts(cuts: tuple[float, ...]) -> Floats:
    """The cuts moved up by EDGE_ULPS float32 ulps, for ``value > cut`` comparisons."""
    exact = np.asarray(cuts, dtype=np.float64)
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    return exact + EDGE_ULPS * ulp


class TensorTracker:
    """A TensorProfile compiled for updates: the cuts as one +inf-padded matrix, the
    category lookups. ``update`` raises ShapeMismatch for a tensor that does not fit."""

    def __init__(self, profile: TensorProfile) -> None:
        self.profile = profile
        numeric = profile.numeric
        self.bins = np.array([len(f.cuts) + 1 for f in numeric], dtype=np.int64)
        width = int(self.bins.max()) if numeric else 1
        self._cuts = np.full((len(numeric), max(width - 1, 1)), np.inf)
        for index, feature in enumerate(numeric):
            self._cuts[index, : len(feature.cuts)] = tolerant_cuts(feature.cuts)
        self._width = width
        self._lookups = [
            {name: code for code, name in enumerate(f.categories)} for f in profile.categorical
        ]

    @property
    def numeric(self) -> tuple[NumericFeature, ...]:
        return self.profile.numeric

    @property
    def categorical(self) -> tuple[CategoricalFeature, ...]:
        return self.profile.categorical

    def empty(self) -> TensorStats:
        f = len(self.profile.numeric)
        return TensorStats(
            np.zeros(f), np.zeros(f), np.zeros(f), np.full(f, np.inf), np.full(f, -np.inf),
            np.zeros(f), np.zeros(f), np.zeros((f, self._width)),
            [np.zeros(len(c.categories) + 1) for c in self.profile.categorical],
        )

    def update(self, stats: TensorStats, array: Tensor) -> None:
        """Add a batched tensor's rows to ``stats``."""
        kind = self.profile.kind
        rows = int(array.shape[0]) if array.ndim else 1
        if kind == "bytes":
            values = [v if isinstance(v, bytes) else str(v).encode() for v in
                      np.asarray(array, dtype=object).reshape(-1)]
            lengths = np.array([len(v) for v in values], dtype=np.float64).reshape(-1, 1)
            self._numeric(stats, lengths)
            self._count_codes(stats, 0, self._codes(0, [_text(v) for v in values]))
        elif kind == "categorical":
            flat = np.asarray(array).reshape(-1)
            self._count_codes(stats, 0, self._codes(0, [str(v) for v in flat.tolist()]))
        else:
            if self.profile.numeric:
                self._numeric(stats, feature_matrix(array, self.profile.layout))
            if self.profile.probability and self.profile.categorical:
                top = np.argmax(np.asarray(array).reshape(rows, -1), axis=1)
                self._count_codes(stats, 0, self._index_codes(0, top))
        stats.rows += rows

    def _numeric(self, stats: TensorStats, matrix: Floats) -> None:
        features = len(self.profile.numeric)
        if matrix.shape[1] != features:
            raise ShapeMismatch(
                f"{matrix.shape[1]} features where the profile has {features}")
        finite = np.isfinite(matrix)
        nan = np.isnan(matrix)
        stats.nan += nan.sum(axis=0)
        stats.inf += (~finite & ~nan).sum(axis=0)
        clean = np.where(finite, matrix, 0.0)
        stats.count += finite.sum(axis=0)
        stats.total += clean.sum(axis=0)
        stats.squares += np.square(clean).sum(axis=0)
        if finite.all():
            np.minimum(stats.low, matrix.min(axis=0, initial=np.inf), out=stats.low)
            np.maximum(stats.high, matrix.max(axis=0, initial=-np.inf), out=stats.high)
        else:
            np.minimum(stats.low, np.where(finite, matrix, np.inf).min(axis=0, initial=np.inf),
                       out=stats.low)
            np.maximum(stats.high,
                       np.where(finite, matrix, -np.inf).max(axis=0, initial=-np.inf),
                       out=stats.high)
        # Bin index = how many (tolerant) cuts lie below the value (right-closed bins); the
        # padding cuts are +inf, so never below. Non-finite values are left out of the histogram.
        step = max(1, _CHUNK_VALUES // max(1, features * self._cuts.shape[1]))
        width = self._width
        offsets = np.arange(features) * width
        for start in range(0, matrix.shape[0], step):
            part = matrix[start:start + step]
            index = (part[:, :, None] > self._cuts[None, :, :]).sum(axis=2) + offsets
            keep = finite[start:start + step]
            counted = np.bincount(index[keep], minlength=features * width)
            stats.hist += counted.reshape(features, width)

    def _codes(self, position: int, values: list[str]) -> npt.NDArray[np.int64]:
        lookup = self._lookups[position]
        other = len(lookup)
        return np.fromiter((lookup.get(v, other) for v in values), dtype=np.int64,
                           count=len(values))

    def _index_codes(self, position: int, top: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        # top-1 categories are the class indices "0".."C-1" as built; others map generally.
        categories = self.profile.categorical[position].categories
        if categories == tuple(str(i) for i in range(len(categories))):
            return np.where(top < len(categories), top, len(categories)).astype(np.int64)
        return self._codes(position, [str(v) for v in top.tolist()])

    def _count_codes(self, stats: TensorStats, position: int,
                     codes: npt.NDArray[np.int64]) -> None:
        counts = stats.categories[position]
        counts += np.bincount(codes, minlength=counts.shape[0])[: counts.shape[0]]


def _text(value: bytes) -> str:
    return value.decode("utf-8", "backslashreplace")
