"""The servicer's view of one gRPC call: the grpc.aio context plus the caller's typed
RequestContext (tenant, observation record) that the edge built for it."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

from gateway.request.context import RequestContext

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


class CallContext:
    """Wraps the grpc.aio context the edge received. ``caller`` is the request context the
    pipeline takes; trailing metadata the servicer sets is added to the edge's own (the
    trace id) instead of replacing it. Everything else goes to the real context."""

    __slots__ = ("_context", "_metadata", "_ours", "caller")

    def __init__(
        self, context: Context, caller: RequestContext, ours: tuple[tuple[str, str], ...] = (),
        metadata: tuple[tuple[str, Any], ...] | None = None,
    ) -> None:
        self._context = context
        self._ours = ours
        self._metadata = metadata  # as the edge read it: grpc.aio builds it anew per call
        self.caller = caller

    def invocation_metadata(self) -> Any:
        if self._metadata is None:
            self._metadata = tuple(self._context.invocation_metadata() or ())
        return self._metadata

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()

    def set_trailing_metadata(self, metadata: Any) -> None:
        self._context.set_trailing_metadata((*self._ours, *tuple(metadata)))

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        if trailing_metadata:
            trailing_metadata = (*self._ours, *tuple(trailing_metadata))
        await self._context.abort(code, details, trailing_metadata)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def caller_of(context: Any) -> RequestContext:
    """The RequestContext of a call the edge authenticated (a guarded method's context)."""
    if not isinstance(context, CallContext):
        raise TypeError("not a call the edge authenticated")  # a wiring mistake
    return context.caller
