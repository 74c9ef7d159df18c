"""Version routing: labels, the weighted split for requests naming no version and sticky
routing keys. Pure functions over a RoutingTable, plus the Router that picks split points."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from gateway.errors import InvalidRequestError, ModelNotFoundError
from gateway.request.headers import LABEL_KEY, ROUTING_KEY
from model_store.labels import LABEL, RoutingSpec

_MAX_KEY: Final = 256


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """A model's routing, with every target resolved to a version number. ``weights`` is
    sorted by version so that raising a newer version's weight moves the fewest keys."""

    labels: Mapping[str, int] = field(default_factory=dict)
    weights: tuple[tuple[int, float], ...] = ()
    shadow: int | None = None
    shadow_fraction: float = 0.0

    @classmethod
    def from_spec(cls, spec: RoutingSpec) -> RoutingTable:
        """Resolve a parsed routing.toml (targets were checked when it was parsed)."""
        merged: dict[int, float] = {}
        for target, weight in spec.weights:
            version = spec.version_of(target)
            merged[version] = merged.get(version, 0.0) + weight
        shadow = spec.version_of(spec.shadow_target) if spec.shadow_target else None
        return cls(
            labels=dict(spec.labels),
            weights=tuple(sorted((v, w) for v, w in merged.items() if w > 0)),
            shadow=shadow if spec.shadow_fraction > 0 else None,
            shadow_fraction=spec.shadow_fraction,
        )


def split_point(model: str, key: str) -> float:
    """A routing key's fixed point in [0, 1): the same key and model always give the same
    point, on every replica, so no state is shared to keep a key sticky."""
    digest = hashlib.blake2b(f"{model}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def choose_weighted(weights: Sequence[tuple[int, float]], point: float) -> int:
    """The version whose share of the cumulative weights contains ``point`` (in [0, 1))."""
    if not weights:
        raise ValueError("no weights to choose from")
    threshold = point * sum(w for _, w in weights)
    total = 0.0
    for version, weight in weights:
        total += weight
        if threshold < total:
            return version
    return weights[-1][0]  # float rounding at the very top of the range


def requested_target(model_version: str, label: str | None,
                     labels: Mapping[str, int] | None = None) -> str:
    """What the request names: model_version, else the x-model-label entry, else ''. Both
    may be sent when they name the same version: the same label, or a number that the
    model's ``labels`` map the label to."""
    if label is None or not label:
        return model_version
    if not LABEL.fullmatch(label):
        raise InvalidRequestError(
            f"{LABEL_KEY} must be a label matching [A-Za-z][A-Za-z0-9_-]* (max 64 characters)"
        )
    same_number = (model_version.isdigit() and len(model_version) <= 18
                   and labels is not None and labels.get(label) == int(model_version))
    if model_version and model_version != label and not same_number:
        raise InvalidRequestError(
            f"model_version '{model_version[:64]}' and {LABEL_KEY} '{label}' disagree; "
            "send one of them"
        )
    return label


def label_version(table: RoutingTable, model: str, label: str) -> int:
    """The version a label points to; NOT_FOUND for an undeclared label."""
    version = table.labels.get(label)
    if version is None:
        raise ModelNotFoundError(f"model '{model}' has no version label '{label}'")
    return version


def split_version(
    table: RoutingTable, ready: Collection[int], point: float
) -> int | None:
    """The version a request naming no version goes to: the weighted split over the ready
    targets (weights of targets that are not ready are left out), or None when no weighted
    target is ready and the caller falls back to the highest ready version."""
    usable = [(v, w) for v, w in table.weights if v in ready]
    if not usable:
        return None
    return choose_weighted(usable, point)


class Router:
    """Picks split points: from the routing key when one is sent (sticky), else at random."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def point(self, model: str, key: str | None) -> float:
        """The request's point in [0, 1)."""
        if key:
            if len(key) > _MAX_KEY:
                raise InvalidRequestError(f"{ROUTING_KEY} is longer than {_MAX_KEY} characters")
            return split_point(model, key)
        return self._rng.random()

    def shadow_due(self, table: RoutingTable) -> bool:
        """Whether this request is mirrored to the shadow version (a fair coin of the
        configured fraction; independent of the routing key so sticky users are sampled
        like everyone else)."""
        return table.shadow is not None and self._rng.random() < table.shadow_fraction
