"""Overload shedding: a cap on concurrent in-flight inference RPCs (ModelInfer), answered
at once with RESOURCE_EXHAUSTED when reached; health, metadata and reflection never wait."""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, TypeAlias

import grpc

from gateway.errors import RETRY_AFTER_KEY, OverloadedError
from gateway.status import status_of
from modelgate_pb import grpc_service_pb2 as pb

INFERENCE_SERVICE: Final = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# The RPCs that carry tensors and do work; every other RPC is cheap and stays uncapped, so
# probes (grpc.health, ServerLive/Ready, ModelReady) answer however loaded the server is.
CAPPED_METHODS: Final = frozenset({
    f"/{INFERENCE_SERVICE}/ModelInfer",
    f"/{INFERENCE_SERVICE}/ModelStreamInfer",
})
# No modelgate-limit trailer: that one names a tenant's quota (and is counted as such).

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


class InflightLimit:
    """Counts in-flight RPCs against ``limit`` (0: unlimited). Single event loop: no lock."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.limit = limit
        self.inflight = 0
        self.rejected = 0
        self._clock = clock
        self._mean_s = 0.0  # moving average of admitted RPCs' durations, for retry hints

    def enter(self) -> float:
        """Admit one RPC (returns its start time) or raise OverloadedError."""
        if self.limit and self.inflight >= self.limit:
            self.rejected += 1
            raise OverloadedError(
                f"the gateway is at its limit of {self.limit} concurrent inference "
                "requests; retry shortly",
                trailers={RETRY_AFTER_KEY: str(self.retry_after_ms())},
            )
        self.inflight += 1
        return self._clock()

    def leave(self, started: float) -> None:
        self.inflight -= 1
        elapsed = self._clock() - started
        self._mean_s = elapsed if not self._mean_s else 0.9 * self._mean_s + 0.1 * elapsed

    def retry_after_ms(self) -> int:
        # One typical RPC's time: by then, about one slot per finished RPC is free again.
        return max(1, math.ceil(self._mean_s * 1000))


class InflightLimitInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps the capped methods' handlers; the count covers the whole RPC, auth included,
    so a flood is shed before any key is hashed or any tensor decoded."""

    def __init__(self, limit: InflightLimit) -> None:
        self.limit = limit
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not self.limit.limit or method not in CAPPED_METHODS:
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: Handler) -> Handler:
        limit = self.limit

        async def admit(context: Context) -> float:
            try:
                return limit.enter()
            except OverloadedError as exc:
                status = status_of(exc)
                context.set_trailing_metadata(tuple(status.trailers.items()))
                await context.abort(status.code, status.message)
                raise  # unreachable: abort raises

        if handler.unary_unary is not None or handler.stream_unary is not None:
            unary_behavior: Any = handler.unary_unary or handler.stream_unary

            async def unary(request: Any, context: Context) -> Any:
                started = await admit(context)
                try:
                    return await unary_behavior(request, context)
                finally:
                    limit.leave(started)

            make = (grpc.unary_unary_rpc_method_handler if handler.unary_unary is not None
                    else grpc.stream_unary_rpc_method_handler)
            return make(unary, handler.request_deserializer, handler.response_serializer)
        stream_behavior: Any = handler.unary_stream or handler.stream_stream

        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            started = await admit(context)
            try:
                result = stream_behavior(request, context)
                if inspect.isasyncgen(result):
                    async for response in result:
                        yield response
                else:
                    await result
            finally:
                limit.leave(started)

        make = (grpc.unary_stream_rpc_method_handler if handler.unary_stream is not None
                else grpc.stream_stream_rpc_method_handler)
        return make(stream, handler.request_deserializer, handler.response_serializer)
