"""One HTTP request as the REST endpoints see it (method, path, headers, the whole body) and
the response they answer with; the connection module reads and writes them."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from gateway.errors import InvalidRequestError
from gateway.tenancy.tenants import Tenant

JSON: Final = "application/json"


@dataclass(slots=True)
class HttpRequest:
    """A complete request. Header names are lower case; repeated headers are joined with
    ', '. ``peer_subject`` looks up the verified client certificate's subject (mTLS);
    ``tenant`` is set when the head was authenticated before the body was read."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes
    peer: str
    peer_subject: Callable[[], str | None] = field(default=lambda: None)
    tenant: Tenant | None = None


@dataclass(slots=True)
class HttpResponse:
    """A response: status, body and headers beyond Content-Type and Content-Length."""

    status: int
    body: bytes = b""
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()


def json_response(status: int, payload: object,
                  headers: tuple[tuple[str, str], ...] = ()) -> HttpResponse:
    """A JSON response (compact separators: bodies are for programs)."""
    return HttpResponse(status, json.dumps(payload, separators=(",", ":")).encode(), JSON,
                        headers)


def error_response(status: int, message: str,
                   headers: tuple[tuple[str, str], ...] = ()) -> HttpResponse:
    """The V2 error body: ``{"error": "..."}``."""
    return json_response(status, {"error": message}, headers)


def json_object(body: bytes) -> dict[str, Any]:
    """An optional JSON object body (empty: no fields); InvalidRequestError otherwise."""
    if not body.strip():
        return {}
    try:
        parsed = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidRequestError("the request body is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    return parsed
