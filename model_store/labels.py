"""A model's routing declaration: version labels, the weighted split for requests that name
no version, and shadow mirroring, read from the sidecar file ``<model>/routing.toml``."""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from model_store.errors import ModelConfigError

ROUTING_FILE: Final = "routing.toml"
# Labels start with a letter, so they never clash with version numbers.
LABEL: Final = re.compile(r"[A-Za-z][A-Za-z0-9_\-]{0,63}")
_NUMBER: Final = re.compile(r"[1-9][0-9]{0,17}")
_SECTIONS: Final = frozenset({"labels", "weights", "shadow"})


class RoutingConfigError(ModelConfigError):
    """routing.toml is unreadable or declares something inconsistent."""


@dataclass(frozen=True, slots=True)
class RoutingSpec:
    """What routing.toml declares. Targets (weights, shadow) are labels or version numbers
    as text; ``weights`` is empty when requests naming no version go to the highest ready
    version."""

    labels: Mapping[str, int] = field(default_factory=dict)
    weights: tuple[tuple[str, float], ...] = ()
    shadow_target: str | None = None
    shadow_fraction: float = 0.0

    def version_of(self, target: str) -> int:
        """The version a target (label or number) names; raises RoutingConfigError."""
        if _NUMBER.fullmatch(target):
            return int(target)
        if target in self.labels:
            return self.labels[target]
        raise RoutingConfigError(f"{ROUTING_FILE}: '{target}' is neither a label nor a version")


def read_routing(model_folder: Path) -> RoutingSpec:
    """The routing declared next to a model's config.pbtxt (an empty spec when there is no
    routing.toml)."""
    path = model_folder / ROUTING_FILE
    if not path.is_file():
        return RoutingSpec()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RoutingConfigError(f"cannot read {ROUTING_FILE}: {exc}") from exc
    return parse_routing(text)


def parse_routing(text: str) -> RoutingSpec:
    """Parse and check routing.toml text; raises RoutingConfigError naming the problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RoutingConfigError(f"{ROUTING_FILE} is not TOML: {exc}") from exc
    unknown = set(data) - _SECTIONS
    if unknown:
        raise RoutingConfigError(
            f"{ROUTING_FILE}: unknown section(s) {', '.join(sorted(unknown))} "
            f"(expected {', '.join(sorted(_SECTIONS))})"
        )
    labels = {name: _version(name, raw) for name, raw in _table(data, "labels").items()}
    for name in labels:
        if not LABEL.fullmatch(name):
            raise RoutingConfigError(
                f"{ROUTING_FILE}: label '{name}' must match [A-Za-z][A-Za-z0-9_-]* (max 64)"
            )
    spec = RoutingSpec(labels=labels)
    weights = tuple((key, _weight(key, raw)) for key, raw in _table(data, "weights").items())
    if weights and not any(w > 0 for _, w in weights):
        raise RoutingConfigError(f"{ROUTING_FILE}: [weights] needs at least one weight > 0")
    for name, _ in weights:
        spec.version_of(name)
    shadow = _table(data, "shadow")
    extra = set(shadow) - {"target", "fraction"}
    if extra:
        raise RoutingConfigError(
            f"{ROUTING_FILE}: [shadow] takes target and fraction, not {', '.join(sorted(extra))}"
        )
    target: str | None = None
    fraction = 0.0
    if shadow:
        raw_target = shadow.get("target")
        if isinstance(raw_target, int) and not isinstance(raw_target, bool):
            raw_target = str(raw_target)
        if not isinstance(raw_target, str):
            raise RoutingConfigError(f"{ROUTING_FILE}: [shadow] target must be a label or version")
        spec.version_of(raw_target)
        target = raw_target
        fraction = _fraction(shadow.get("fraction", 1.0))
    return RoutingSpec(
        labels=labels, weights=weights, shadow_target=target, shadow_fraction=fraction
    )


def _table(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise RoutingConfigError(f"{ROUTING_FILE}: [{name}] must be a table")
    return table


def _version(label: str, raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise RoutingConfigError(
            f"{ROUTING_FILE}: label '{label}' must name a version number >= 1, got {raw!r}"
        )
    return raw


def _weight(target: str, raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise RoutingConfigError(f"{ROUTING_FILE}: weight of '{target}' must be a number")
    value = float(raw)
    if not math.isfinite(value) or value < 0:
        raise RoutingConfigError(f"{ROUTING_FILE}: weight of '{target}' must be finite and >= 0")
    return value


def _fraction(raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 <= raw <= 1:
        raise RoutingConfigError(f"{ROUTING_FILE}: [shadow] fraction must lie in 0..1")
    return float(raw)
