"""The REST endpoints of Triton's system shared memory extension: register, unregister and
status of the caller's regions, in Triton's JSON (gateway/pipeline/shared_memory.py owns the
regions)."""

from __future__ import annotations

from typing import Any

from gateway.errors import InvalidRequestError
from gateway.http.messages import HttpRequest, HttpResponse, json_object, json_response
from gateway.http.routes import Route
from gateway.pipeline.shared_memory import SharedMemory
from gateway.request.context import RequestContext


class SharedMemoryEndpoints:
    """SystemSharedMemoryStatus, ...Register and ...Unregister over one SharedMemory."""

    def __init__(self, memory: SharedMemory) -> None:
        self._memory = memory

    async def status(self, route: Route, request: HttpRequest,
                     context: RequestContext) -> HttpResponse:
        regions = self._memory.status(context.tenant.id, route.model)
        return json_response(200, [{"name": r.name, "key": r.key, "offset": r.offset,
                                    "byte_size": r.byte_size} for r in regions])

    async def register(self, route: Route, request: HttpRequest,
                       context: RequestContext) -> HttpResponse:
        body = json_object(request.body)
        key = body.get("key")
        if not isinstance(key, str):
            raise InvalidRequestError("'key' must be the shared memory object's name")
        self._memory.register(context.tenant.id, route.model, key,
                              _integer(body, "offset", 0), _integer(body, "byte_size", None))
        return json_response(200, {})

    async def unregister(self, route: Route, request: HttpRequest,
                         context: RequestContext) -> HttpResponse:
        self._memory.unregister(context.tenant.id, route.model)
        return json_response(200, {})


def _integer(body: dict[str, Any], field: str, default: int | None) -> int:
    value = body.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequestError(f"'{field}' must be an integer")
    return value
