"""The request headers the gateway reads, the same on every transport (gRPC metadata, HTTP
headers): the version label, the sticky routing key and the W3C trace context."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

LABEL_KEY: Final = "x-model-label"
ROUTING_KEY: Final = "x-routing-key"
TRACE_HEADERS: Final = frozenset({"traceparent", "tracestate"})
_WANTED: Final = frozenset({LABEL_KEY, ROUTING_KEY, *TRACE_HEADERS})

# One header as a transport hands it: gRPC's binary (-bin) metadata values are bytes.
Header = tuple[str, str | bytes]


def request_metadata(
    metadata: Iterable[Header] | None,
) -> tuple[str | None, str | None, dict[str, str]]:
    """In one pass: x-model-label, x-routing-key and the W3C trace headers (passed on to
    upstreams as they came)."""
    label: str | None = None
    key: str | None = None
    trace: dict[str, str] = {}
    for name, value in metadata or ():
        if name not in _WANTED:
            continue
        if name in TRACE_HEADERS:
            trace[name] = value if isinstance(value, str) else value.decode("latin-1")
            continue
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        if name == LABEL_KEY:
            label = text.strip()
        else:
            key = text
    return label, key, trace
