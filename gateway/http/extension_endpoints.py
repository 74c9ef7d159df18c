"""The REST endpoints of Triton's trace and logging extensions (GET reads, POST changes, in
Triton's JSON) and the 501 answer of the extensions modelgate does not serve."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from gateway.errors import InvalidRequestError, NotSupportedError
from gateway.http.messages import HttpRequest, HttpResponse, json_response
from gateway.http.routes import Route
from gateway.observability.log_settings import Value
from gateway.observability.trace_settings import LEVEL
from gateway.pipeline.catalog import not_served
from gateway.pipeline.server_settings import ServerSettings
from gateway.request.context import RequestContext


class ExtensionEndpoints:
    """TraceSetting and LogSettings over the server settings, and the refusals."""

    def __init__(self, settings: ServerSettings) -> None:
        self._settings = settings

    async def trace_setting(self, route: Route, request: HttpRequest,
                            context: RequestContext) -> HttpResponse:
        changes = None
        if request.method == "POST":
            # A string is one value, a list several, null clears the setting.
            changes = {name: _trace_values(name, value)
                       for name, value in _settings_body(request.body).items()}
        report = self._settings.trace(context.tenant, route.model, changes)
        # Triton's JSON: trace_level is a list, every other setting a string.
        return json_response(200, {name: values if name == LEVEL else "".join(values[:1])
                                   for name, values in report.items()})

    async def log_settings(self, route: Route, request: HttpRequest,
                           context: RequestContext) -> HttpResponse:
        changes: dict[str, Value] | None = None
        if request.method == "POST":
            changes = {name: _log_value(name, value)
                       for name, value in _settings_body(request.body).items()}
        return json_response(200, self._settings.logging(context.tenant, changes))

    async def not_served(self, route: Route, request: HttpRequest,
                         context: RequestContext) -> HttpResponse:
        raise NotSupportedError(not_served(route.name))


def _settings_body(body: bytes) -> Mapping[str, Any]:
    try:
        parsed = json.loads(body) if body.strip() else {}
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidRequestError("the request body is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise InvalidRequestError("the settings must be a JSON object")
    return parsed


def _trace_values(name: str, value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [str(value)]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise InvalidRequestError(
        f"trace setting '{name[:64]}' must be a string, a list of strings or null")


def _log_value(name: str, value: object) -> Value:
    if isinstance(value, (bool, int, str)):
        return value
    raise InvalidRequestError(
        f"log setting '{name[:64]}' must be true/false, a number or a string")
