"""The reference profile of a model version (``profile.json`` beside ``model.onnx``): per
tensor, its features with their bin cut points or categories and the reference's statistics.
Parsing checks every field and raises ProfileError naming what is wrong."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

SCHEMA: Final = "modelgate.profile/1"
PROFILE_FILE: Final = "profile.json"
MAX_BINS: Final = 64
MAX_CATEGORIES: Final = 1000
MAX_FEATURES: Final = 100_000
MAX_PROFILE_BYTES: Final = 256 * 1024 * 1024

Role = Literal["input", "output"]
Kind = Literal["numeric", "categorical", "bytes"]
Layout = Literal["columns", "channels", "tensor"]
ROLES: Final = ("input", "output")
KINDS: Final = ("numeric", "categorical", "bytes")
LAYOUTS: Final = ("columns", "channels", "tensor")


class ProfileError(Exception):
    """A profile.json that cannot be used; the message names the field and the problem."""


@dataclass(frozen=True, slots=True)
class NumericReference:
    """A numeric feature's statistics over the reference data; ``counts`` per bin."""

    count: int
    mean: float
    std: float
    min: float
    max: float
    nan: int
    inf: int
    counts: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class NumericFeature:
    """A numeric feature binned by ``cuts`` (strictly increasing): bin 0 is (-inf, c0],
    bin i is (c[i-1], c[i]], the last (c[-1], +inf); len(cuts) + 1 bins."""

    name: str
    cuts: tuple[float, ...]
    reference: NumericReference | None = None


@dataclass(frozen=True, slots=True)
class CategoricalFeature:
    """A categorical feature: one bin per category plus a last one for every other value
    (never seen in the reference, or beyond its top-k)."""

    name: str
    categories: tuple[str, ...]
    counts: tuple[float, ...] | None = None  # the reference's, len(categories) + 1

    @property
    def reference_count(self) -> int:
        return int(sum(self.counts)) if self.counts is not None else 0


@dataclass(frozen=True, slots=True)
class TensorProfile:
    """One input or output. numeric: ``numeric`` per column / channel / whole tensor
    (``layout``), plus a ``top1`` categorical when ``probability``; categorical (integer
    labels): one categorical over its values; bytes: a ``length`` numeric and a ``value``
    categorical over the reference's top-k vocabulary."""

    name: str
    role: Role
    kind: Kind
    layout: Layout
    numeric: tuple[NumericFeature, ...] = ()
    categorical: tuple[CategoricalFeature, ...] = ()
    probability: bool = False


@dataclass(frozen=True, slots=True)
class Profile:
    """A version's reference: its tensors, how many rows it was built from, and from what."""

    tensors: tuple[TensorProfile, ...]
    rows: int = 0
    source: str = ""

    def tensor(self, name: str, role: Role) -> TensorProfile | None:
        for tensor in self.tensors:
            if tensor.name == name and tensor.role == role:
                return tensor
        return None

    @property
    def has_reference(self) -> bool:
        """Whether the features carry reference statistics (not only bins)."""
        return any(f.reference is not None for t in self.tensors for f in t.numeric) or any(
            f.counts is not None for t in self.tensors for f in t.categorical)


# ---- JSON ----------------------------------------------------------------------------


def to_json(profile: Profile) -> dict[str, Any]:
    """The documented profile.json object (docs/monitoring.md: schema)."""
    return {
        "schema": SCHEMA, "source": profile.source, "rows": profile.rows,
        "tensors": [_tensor_json(t) for t in profile.tensors],
    }


def dumps(profile: Profile) -> str:
    """profile.json text: stable key order, one tensor per block, so rebuilds diff cleanly."""
    return json.dumps(to_json(profile), indent=1, sort_keys=True, allow_nan=False) + "\n"


def _tensor_json(tensor: TensorProfile) -> dict[str, Any]:
    features: list[dict[str, Any]] = []
    for numeric in tensor.numeric:
        item: dict[str, Any] = {"name": numeric.name, "type": "numeric",
                                "cuts": list(numeric.cuts)}
        ref = numeric.reference
        if ref is not None:
            item["reference"] = {
                "count": ref.count, "mean": ref.mean, "std": ref.std, "min": ref.min,
                "max": ref.max, "nan": ref.nan, "inf": ref.inf, "counts": list(ref.counts),
            }
        features.append(item)
    for categorical in tensor.categorical:
        entry: dict[str, Any] = {"name": categorical.name, "type": "categorical",
                                 "categories": list(categorical.categories)}
        if categorical.counts is not None:
            entry["reference"] = {"counts": list(categorical.counts)}
        features.append(entry)
    return {"name": tensor.name, "role": tensor.role, "kind": tensor.kind,
            "layout": tensor.layout, "probability": tensor.probability, "features": features}


def load(path: Path) -> Profile:
    """Read and check a profile.json; ProfileError says what is wrong and where."""
    try:
        size = path.stat().st_size
        if size > MAX_PROFILE_BYTES:
            raise ProfileError(f"{path.name} is {size} bytes, more than {MAX_PROFILE_BYTES}")
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProfileError(f"cannot read {path.name}: {exc}") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProfileError(f"{path.name} is not JSON: {exc}") from exc
    return parse(data)


def parse(data: Any) -> Profile:
    """A Profile from the decoded JSON object; ProfileError for anything off-schema."""
    obj = _object(data, "profile")
    if obj.get("schema") != SCHEMA:
        raise ProfileError(f"schema must be '{SCHEMA}', got {obj.get('schema')!r}")
    tensors = _list(obj.get("tensors"), "tensors")
    parsed = tuple(_tensor(t, f"tensors[{i}]") for i, t in enumerate(tensors))
    count = sum(len(t.numeric) + len(t.categorical) for t in parsed)
    if count > MAX_FEATURES:
        raise ProfileError(f"{count} features, more than {MAX_FEATURES}")
    seen = set()
    for tensor in parsed:
        if (tensor.name, tensor.role) in seen:
            raise ProfileError(f"{tensor.role} tensor '{tensor.name}' appears twice")
        seen.add((tensor.name, tensor.role))
    source = obj.get("source", "")
    return Profile(parsed, _count(obj.get("rows", 0), "rows"),
                   source if isinstance(source, str) else "")


def _tensor(data: Any, where: str) -> TensorProfile:
    obj = _object(data, where)
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise ProfileError(f"{where}.name must be a non-empty string")
    role, kind, layout = obj.get("role"), obj.get("kind"), obj.get("layout", "columns")
    if role not in ROLES:
        raise ProfileError(f"{where}.role must be one of {ROLES}, got {role!r}")
    if kind not in KINDS:
        raise ProfileError(f"{where}.kind must be one of {KINDS}, got {kind!r}")
    if layout not in LAYOUTS:
        raise ProfileError(f"{where}.layout must be one of {LAYOUTS}, got {layout!r}")
    probability = obj.get("probability", False)
    if not isinstance(probability, bool):
        raise ProfileError(f"{where}.probability must be true or false")
    numeric: list[NumericFeature] = []
    categorical: list[CategoricalFeature] = []
    for i, raw in enumerate(_list(obj.get("features"), f"{where}.features")):
        at = f"{where}.features[{i}]"
        feature = _object(raw, at)
        if feature.get("type") == "numeric":
            numeric.append(_numeric(feature, at))
        elif feature.get("type") == "categorical":
            categorical.append(_categorical(feature, at))
        else:
            raise ProfileError(f"{at}.type must be 'numeric' or 'categorical'")
    # A probability tensor's top-1 feature is left out when another output is that class.
    expected = {"numeric": (None, 0 if not probability else 1), "categorical": (0, 1),
                "bytes": (1, 1)}[kind]
    top1_left_out = probability and not categorical
    if (expected[0] is not None and len(numeric) != expected[0]) or (
            len(categorical) != expected[1] and not top1_left_out):
        raise ProfileError(f"{where}: a {kind} tensor{' (probability)' if probability else ''} "
                           f"has {expected[0] if expected[0] is not None else 'any number of'} "
                           f"numeric and {expected[1]} categorical feature(s), got "
                           f"{len(numeric)} and {len(categorical)}")
    return TensorProfile(name, role, kind, layout, tuple(numeric), tuple(categorical),
                         probability)


def _numeric(obj: Mapping[str, Any], where: str) -> NumericFeature:
    name = _name(obj, where)
    cuts = tuple(_number(c, f"{where}.cuts") for c in _list(obj.get("cuts"), f"{where}.cuts"))
    if len(cuts) + 1 > MAX_BINS:
        raise ProfileError(f"{where}.cuts: {len(cuts)} cut points, at most {MAX_BINS - 1}")
    if any(b <= a for a, b in itertools.pairwise(cuts)):
        raise ProfileError(f"{where}.cuts must be strictly increasing")
    if any(not math.isfinite(c) for c in cuts):
        raise ProfileError(f"{where}.cuts must be finite")
    reference: NumericReference | None = None
    if "reference" in obj:
        ref = _object(obj["reference"], f"{where}.reference")
        counts = _counts(ref.get("counts"), len(cuts) + 1, f"{where}.reference.counts")
        reference = NumericReference(
            count=_count(ref.get("count"), f"{where}.reference.count"),
            mean=_number(ref.get("mean"), f"{where}.reference.mean"),
            std=_number(ref.get("std"), f"{where}.reference.std"),
            min=_number(ref.get("min"), f"{where}.reference.min"),
            max=_number(ref.get("max"), f"{where}.reference.max"),
            nan=_count(ref.get("nan", 0), f"{where}.reference.nan"),
            inf=_count(ref.get("inf", 0), f"{where}.reference.inf"),
            counts=counts,
        )
    return NumericFeature(name, cuts, reference)


def _categorical(obj: Mapping[str, Any], where: str) -> CategoricalFeature:
    name = _name(obj, where)
    categories = _list(obj.get("categories"), f"{where}.categories")
    if len(categories) > MAX_CATEGORIES:
        raise ProfileError(f"{where}.categories: {len(categories)}, at most {MAX_CATEGORIES}")
    if not all(isinstance(c, str) for c in categories) or len(set(categories)) != len(categories):
        raise ProfileError(f"{where}.categories must be distinct strings")
    counts: tuple[float, ...] | None = None
    if "reference" in obj:
        ref = _object(obj["reference"], f"{where}.reference")
        counts = _counts(ref.get("counts"), len(categories) + 1, f"{where}.reference.counts")
    return CategoricalFeature(name, tuple(categories), counts)


def _name(obj: Mapping[str, Any], where: str) -> str:
    name = obj.get("name")
    if not isinstance(name, str) or not name or len(name) > 256:
        raise ProfileError(f"{where}.name must be a string of 1..256 characters")
    return name


def _object(data: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(data, dict):
        raise ProfileError(f"{where} must be a JSON object")
    return data


def _list(data: Any, where: str) -> Sequence[Any]:
    if not isinstance(data, list):
        raise ProfileError(f"{where} must be a JSON array")
    return data


def _number(data: Any, where: str) -> float:
    if isinstance(data, bool) or not isinstance(data, int | float):
        raise ProfileError(f"{where} must be a number, got {data!r}")
    return float(data)


def _count(data: Any, where: str) -> int:
    if isinstance(data, bool) or not isinstance(data, int) or data < 0:
        raise ProfileError(f"{where} must be a whole number >= 0, got {data!r}")
    return data


def _counts(data: Any, length: int, where: str) -> tuple[float, ...]:
    values = tuple(_number(v, where) for v in _list(data, where))
    if len(values) != length:
        raise ProfileError(f"{where}: {len(values)} counts for {length} bins")
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise ProfileError(f"{where} must be finite and >= 0")
    return values
