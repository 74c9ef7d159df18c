"""Builds profiles: bin cut points from quantiles of reference data, categories from its
most frequent values, and the reference statistics from the same accumulator the live
statistics use, so both sides of a drift score are counted the same way."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np

from gateway.monitoring.accumulator import (
    TensorStats,
    TensorTracker,
    _text,
    default_layout,
    feature_matrix,
)
from gateway.monitoring.profile import (
    MAX_BINS,
    SCHEMA,
    CategoricalFeature,
    Kind,
    Layout,
    NumericFeature,
    Profile,
    ProfileError,
    Role,
    TensorProfile,
    parse,
)
from runtimes.base import Tensor

DEFAULT_BINS: Final = 10
# Integer outputs with at most this many distinct values are class labels (categorical).
LABEL_CATEGORIES: Final = 100
VOCABULARY: Final = 100
# A float output is a probability vector when every row lies in [0, 1] and sums to 1.
_SUM_TOLERANCE: Final = 1e-3


def tensor_kind(array: Tensor, role: Role) -> Kind:
    """How a tensor is profiled when nothing says otherwise: BYTES as bytes, integer
    outputs as class labels, everything else numeric."""
    kind = np.asarray(array).dtype.kind
    if kind in "OSU":
        return "bytes"
    if role == "output" and kind in "iub":
        return "categorical"
    return "numeric"


def is_probability(array: Tensor) -> bool:
    data = np.asarray(array)
    if data.dtype.kind != "f" or data.ndim != 2 or data.shape[1] < 2 or data.size == 0:
        return False
    finite = np.isfinite(data).all()
    return bool(finite and data.min() >= 0 and data.max() <= 1
                and np.allclose(data.sum(axis=1), 1.0, atol=_SUM_TOLERANCE))


def quantile_cuts(column: np.ndarray, bins: int) -> tuple[float, ...]:
    """Interior cut points at the 1/bins .. (bins-1)/bins quantiles of the finite values,
    duplicates merged (a value that fills several quantiles becomes one bin's edge)."""
    values = column[np.isfinite(column)]
    if values.size == 0:
        return ()
    points = np.quantile(values, np.arange(1, bins) / bins, method="linear")
    return tuple(float(p) for p in np.unique(points.astype(np.float64)))


def top_categories(values: list[str], limit: int) -> tuple[str, ...]:
    """The ``limit`` most frequent values, most frequent first (ties: sorted by value)."""
    counts = Counter(values)
    return tuple(v for v, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit])


def bins_for(
    name: str, role: Role, array: Tensor, *, layout: Layout | None = None,
    bins: int = DEFAULT_BINS, kind: Kind | None = None, vocabulary: bool = True,
    columns: Sequence[str] = (), top1: bool = True,
) -> TensorProfile:
    """A tensor's features (cuts, categories) from a batched sample of it, without
    reference statistics. ``vocabulary`` False leaves a BYTES tensor's categories empty
    (bins taken from live traffic must not publish callers' values). ``columns`` names
    the numeric features (else ``name[i]``); ``top1`` False leaves a probability tensor
    without its top-1 feature (another output already is that class)."""
    bins = max(2, min(bins, MAX_BINS))
    data = np.asarray(array)
    kind = kind or tensor_kind(data, role)
    rank = max(data.ndim, 1)
    layout = layout or default_layout(rank)
    if kind == "bytes":
        values = [v if isinstance(v, bytes) else str(v).encode() for v in data.reshape(-1)]
        lengths = np.array([len(v) for v in values], dtype=np.float64)
        return TensorProfile(
            name, role, "bytes", "tensor",
            (NumericFeature(f"{name}.length", quantile_cuts(lengths, bins)),),
            (CategoricalFeature(f"{name}.value",
                                top_categories([_text(v) for v in values], VOCABULARY)
                                if vocabulary else ()),),
        )
    if kind == "categorical":
        labels = [str(v) for v in data.reshape(-1).tolist()]
        categories = top_categories(labels, LABEL_CATEGORIES)
        if data.dtype.kind in "iub":
            categories = tuple(sorted(categories, key=int))
        return TensorProfile(name, role, "categorical", "tensor", (),
                             (CategoricalFeature(name, categories),))
    matrix = feature_matrix(data, layout)
    if len(columns) == matrix.shape[1]:
        names = list(columns)
    elif matrix.shape[1] == 1 and (layout == "tensor" or data.ndim <= 1):
        names = [name]
    else:
        names = [f"{name}[{i}]" for i in range(matrix.shape[1])]
    numeric = tuple(NumericFeature(n, quantile_cuts(matrix[:, i], bins))
                    for i, n in enumerate(names))
    probability = role == "output" and is_probability(data)
    top = ((CategoricalFeature(f"{name}.top1", tuple(str(i) for i in range(data.shape[1]))),)
           if probability and top1 else ())
    return TensorProfile(name, role, "numeric", layout, numeric, top, probability)


def with_reference(tensor: TensorProfile, stats: TensorStats) -> TensorProfile:
    """``tensor`` with ``stats`` as its reference statistics."""
    tracker = TensorTracker(tensor)
    numeric = tuple(
        NumericFeature(f.name, f.cuts, stats.numeric_summary(i, int(tracker.bins[i])))
        for i, f in enumerate(tensor.numeric))
    categorical = tuple(
        CategoricalFeature(f.name, f.categories, tuple(float(c) for c in stats.categories[i]))
        for i, f in enumerate(tensor.categorical))
    return TensorProfile(tensor.name, tensor.role, tensor.kind, tensor.layout, numeric,
                         categorical, tensor.probability)


def argmax_outputs(outputs: Mapping[str, Tensor]) -> set[str]:
    """Probability outputs whose top-1 class is, on every row, the value of an integer
    output (a classifier's label): their ``.top1`` would repeat that output's counts."""
    labels = [np.asarray(a).reshape(len(a), -1) for a in outputs.values()
              if np.asarray(a).dtype.kind in "iu" and np.asarray(a).ndim]
    found: set[str] = set()
    for name, array in outputs.items():
        if not is_probability(array):
            continue
        top = np.argmax(np.asarray(array), axis=1)
        if any(label.shape == (len(top), 1) and bool((label[:, 0] == top).all())
               for label in labels):
            found.add(name)
    return found


def build_profile(
    inputs: Mapping[str, Tensor], outputs: Mapping[str, Tensor], *,
    layouts: Mapping[str, Layout] | None = None, bins: int = DEFAULT_BINS, source: str = "",
    names: Mapping[str, Sequence[str]] | None = None,
) -> Profile:
    """A complete profile (bins and reference statistics) from reference rows: the model's
    inputs and, when given, the outputs the model produced for them. ``names``: feature
    names by tensor (a CSV header, an .npz's names, the config's class labels)."""
    layouts = layouts or {}
    names = names or {}
    repeated = argmax_outputs(outputs)
    tensors: list[TensorProfile] = []
    rows = 0
    sides: tuple[tuple[Role, Mapping[str, Tensor]], ...] = (("input", inputs),
                                                            ("output", outputs))
    for role, arrays in sides:
        for name, array in arrays.items():
            shape = np.asarray(array).shape
            rows = max(rows, int(shape[0]) if shape else 1)
            binned = bins_for(name, role, array, layout=layouts.get(name), bins=bins,
                              columns=names.get(name, ()), top1=name not in repeated)
            tracker = TensorTracker(binned)
            stats = tracker.empty()
            tracker.update(stats, array)
            tensors.append(with_reference(binned, stats))
    for role in ("input", "output"):
        seen = Counter([f.name for t in tensors if t.role == role for f in t.numeric]
                       + [f.name for t in tensors if t.role == role for f in t.categorical])
        twice = sorted(n for n, times in seen.items() if times > 1)
        if twice:
            raise ProfileError(f"{role} feature name(s) {', '.join(twice)} given twice")
    return Profile(tuple(tensors), rows, source)


def profile_from_report(report: Mapping[str, Any], source: str = "") -> Profile:
    """Freeze a drift report's live window (the JSON endpoint's answer for one version) as
    a profile: same bins, the window's figures as the reference. ProfileError when the
    report holds no live rows or is not a drift report."""
    try:
        tensors_meta = report["tensors"]
        features = report["features"]
        rows = int(report["window"]["rows"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProfileError(f"not a drift report of one version: missing {exc}") from exc
    if rows <= 0:
        raise ProfileError("the window holds no live rows; nothing to freeze")
    tensors: list[dict[str, Any]] = []
    for meta in tensors_meta:
        mine = sorted((f for f in features if f["tensor"] == meta["name"]
                       and f["role"] == meta["role"]),
                      key=lambda f: (f["type"] != "numeric", f["position"]))
        entries: list[dict[str, Any]] = []
        for feature in mine:
            live = feature["live"]
            if feature["type"] == "numeric":
                n = live["count"]
                entries.append({"name": feature["name"], "type": "numeric",
                                "cuts": feature["cuts"], "reference": {
                                    "count": int(n), "mean": live["mean"] or 0.0,
                                    "std": live["std"] or 0.0, "min": live["min"] or 0.0,
                                    "max": live["max"] or 0.0, "nan": int(live["nan"]),
                                    "inf": int(live["inf"]), "counts": live["counts"]}})
            else:
                entries.append({"name": feature["name"], "type": "categorical",
                                "categories": feature["categories"],
                                "reference": {"counts": live["counts"]}})
        tensors.append({**meta, "features": entries})
    return parse({"schema": SCHEMA, "source": source, "rows": rows, "tensors": tensors})
