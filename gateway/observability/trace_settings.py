"""The trace sampling ratio, global and per model, as Triton's trace extension reads and sets
it (TraceSetting, /v2/trace/setting): what the samplers of gateway/observability/tracing.py
ask for every new trace, changeable while the server runs."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from gateway.errors import InvalidRequestError

# Triton's setting names. trace_rate N samples one request in N (here at random, the OTel
# ratio 1/N); trace_level OFF samples none, TIMESTAMPS (or TENSORS) the rate's share.
LEVEL: Final = "trace_level"
RATE: Final = "trace_rate"
# modelgate's own: the exact ratio, for values that are not 1/N.
RATIO: Final = "sampling_ratio"
# Triton's settings with one value here: reported, and accepted only unchanged.
_FIXED: Final = {"trace_count": "-1", "log_frequency": "0", "trace_file": "",
                 "trace_mode": "opentelemetry"}
_LEVELS: Final = frozenset({"OFF", "TIMESTAMPS", "TENSORS"})
# TraceIdRatioBased's bound: a trace id's low 64 bits below it are sampled.
_ID_LIMIT: Final = 1 << 64

# A setting's values as both transports carry them (HTTP's single string becomes a list of
# one); an empty list clears it (a model's setting then follows the global one).
Values = Sequence[str]


@dataclass(frozen=True, slots=True)
class _Scope:
    """One scope's sampling: ``ratio`` None = not set here (a model: the global one; the
    global scope: the OTEL_TRACES_SAMPLER sampler decides); ``off`` = trace_level OFF
    (True), TIMESTAMPS (False) or not set here (None: a model follows the global level)."""

    ratio: float | None = None
    off: bool | None = None


class TraceSettings:
    """The sampling ratio of new traces, global and per model. ``enabled`` is False when
    no exporter is configured: settings are then reported OFF and cannot turn tracing on."""

    def __init__(self, ratio: float | None, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._start = _Scope(ratio)
        self._global = self._start
        self._models: dict[str, _Scope] = {}
        self._lock = threading.Lock()  # the export thread never reads; updates are rare

    def bound(self, model: str | None) -> int | None:
        """The sampler's bound for a new trace of ``model`` (None: no model): a trace id
        whose low 64 bits are below it is sampled; None = ask the start-up sampler."""
        scope = self._effective(model)
        if scope.off:
            return 0
        return None if scope.ratio is None else round(scope.ratio * _ID_LIMIT)

    def report(self, model: str = "") -> dict[str, list[str]]:
        """The settings of ``model`` ('' = global) in Triton's names, each a list of strings."""
        scope = self._effective(model)
        ratio = scope.ratio
        off = scope.off or not self.enabled or ratio == 0
        report = {LEVEL: ["OFF" if off else "TIMESTAMPS"],
                  RATE: [_rate_of(ratio)], RATIO: ["" if ratio is None else repr(ratio)]}
        report.update({name: [value] for name, value in _FIXED.items()})
        return report

    def _effective(self, model: str | None) -> _Scope:
        """What applies to ``model``: each of its settings, else the global one."""
        own = self._models.get(model) if model else None
        scope = self._global
        if own is None:
            return _Scope(scope.ratio, bool(scope.off))
        return _Scope(scope.ratio if own.ratio is None else own.ratio,
                      bool(scope.off if own.off is None else own.off))

    def update(self, model: str, settings: Mapping[str, Values]) -> dict[str, list[str]]:
        """Apply ``settings`` to ``model`` ('' = global) all or nothing; returns the report."""
        with self._lock:
            current = self._models.get(model, _Scope()) if model else self._global
            ratio, off = current.ratio, current.off
            for name, values in settings.items():
                if name in _FIXED:
                    if list(values) not in ([], [_FIXED[name]]):
                        raise InvalidRequestError(
                            f"trace setting '{name}' is {_FIXED[name]!r} in modelgate")
                elif name == LEVEL:
                    off = self._level(values)
                elif name in (RATE, RATIO):
                    ratio = self._ratio(name, values, current)
                else:
                    raise InvalidRequestError(
                        f"unknown trace setting '{name[:64]}'; modelgate has {LEVEL}, "
                        f"{RATE}, {RATIO} and {', '.join(_FIXED)}")
            scope = _Scope(ratio, off)
            if model:
                if scope == _Scope():
                    self._models.pop(model, None)
                else:
                    self._models[model] = scope
            else:
                self._global = scope
        return self.report(model)

    def _level(self, values: Values) -> bool | None:
        if not values:
            return None  # cleared: the global level (for the global scope: not off)
        unknown = [v for v in values if v not in _LEVELS]
        if unknown:
            raise InvalidRequestError(
                f"trace_level '{unknown[0][:32]}' is not one of {', '.join(sorted(_LEVELS))}")
        off = "OFF" in values
        if off and len(values) > 1:
            raise InvalidRequestError("trace_level OFF cannot be combined with another level")
        if not off and not self.enabled:
            raise InvalidRequestError(
                "tracing has no exporter: set otlp_endpoint (or OTEL_EXPORTER_OTLP_ENDPOINT)"
                " at start-up to trace")
        return off

    def _ratio(self, name: str, values: Values, current: _Scope) -> float | None:
        if not values:
            return self._start.ratio if current is self._global else None
        if len(values) != 1:
            raise InvalidRequestError(f"trace setting '{name}' takes one value")
        text = values[0].strip()
        try:
            number = float(text) if name == RATIO else int(text)
        except ValueError:
            raise InvalidRequestError(
                f"trace setting '{name}' must be a number, got '{text[:32]}'") from None
        if name == RATIO:
            if not 0 <= number <= 1:
                raise InvalidRequestError("sampling_ratio must be between 0 and 1")
            return number
        if number < 0:
            raise InvalidRequestError("trace_rate must be 0 or more (one request in N)")
        return 0.0 if number == 0 else 1 / number


def _rate_of(ratio: float | None) -> str:
    """trace_rate for ``ratio``: N where the ratio is 1/N (rounded), '' when unset."""
    if ratio is None:
        return ""
    return "0" if ratio == 0 else str(max(1, round(1 / ratio)))
