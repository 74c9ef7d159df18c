"""ModelStreamInfer: Triton's bidirectional inference stream, a second gRPC adapter over the
inference pipeline. Each message is one pipeline inference with its own context and answer.

Semantics (docs/streaming.md): every ModelInferRequest gets one ModelStreamInferResponse,
``infer_response`` or ``error_message`` (a bad message never ends the stream), carrying the
message's id; answers go out as each message completes, so messages that take different
paths (batches, models) may be answered out of order. The API key is checked when the stream
opens (by the edge) and again whenever the tenants file changes: a revoked key ends the
stream UNAUTHENTICATED. An open stream holds no place of the in-flight cap; each message
takes one while it runs (refused in-stream at the cap). At most ``max_open`` streams are
open at once, and one with no message in flight for ``idle_s`` ends UNAVAILABLE. At most
``max_inflight`` messages are read and not yet answered; at the bound the stream is not
read, so HTTP/2 flow control pushes back on the client. Client half-close: in-flight
messages finish, then OK. Cancel or disconnect: queued messages never
run and running ones are dropped. On shutdown open streams get the grace period, then end
UNAVAILABLE."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any, Final, TypeAlias

import grpc

from gateway.errors import (
    RETRY_AFTER_KEY,
    AuthenticationError,
    GatewayError,
    InvalidRequestError,
    OverloadedError,
    QuotaExceededError,
)
from gateway.observability.statistics import record_encoding
from gateway.pipeline.pipeline import InferencePipeline
from gateway.pipeline.shared_memory import SharedMemory
from gateway.request.context import RequestContext
from gateway.request.headers import LABEL_KEY, ROUTING_KEY, request_metadata
from gateway.request.inflight import InflightLimit
from gateway.request.observation import Observation
from gateway.sanitize import echoed
from gateway.status import status_of
from gateway.tenancy.auth import Authenticator, peer_subject
from gateway.tenancy.tenants import Tenant
from gateway.wire.call import caller_of
from gateway.wire.codec import Codecs, varint
from gateway.wire.compression import inflated
from gateway.wire.edge import DEFAULT_MESSAGE_BYTES
from gateway.wire.stream_observer import StreamObserver, StreamTrace
from modelgate_pb import grpc_service_pb2 as pb

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

CODE_PARAMETER: Final = "modelgate-code"  # an error answer's status, as its gRPC code name
TRACEPARENT: Final = "traceparent"
SHUTTING_DOWN: Final = "the server is shutting down"
REVOKED: Final = "the stream's API key is no longer valid"
# A stream refused at max_open is told to wait about this long (a stream's lifetime is
# unknown; a second is a polite first retry).
_OPEN_RETRY_MS: Final = "1000"
_REVOCATION_POLL_S: Final = 1.0
# ModelStreamInferResponse field 2 (infer_response), length-delimited: the encoded answer is
# wrapped without a re-parse.
_INFER_RESPONSE_TAG: Final = b"\x12"


def wrap_answer(answer: bytes | pb.ModelInferResponse) -> bytes:
    """A ModelStreamInferResponse holding ``answer`` (wire bytes or a message)."""
    data = answer if isinstance(answer, bytes) else answer.SerializeToString()
    return _INFER_RESPONSE_TAG + varint(len(data)) + data


def error_answer(exc: BaseException, request: pb.ModelInferRequest | None) -> tuple[bytes, str]:
    """The in-stream error for one message: ``error_message`` as the status table words it,
    and an ``infer_response`` carrying the message's id, model and the status's trailers
    (retry-after-ms, modelgate-limit) plus its code as parameters. Returns it and the code.
    The message text starts ``id '<id>': `` for a message with an id: tritonclient hands a
    callback only the text, so that is where it can match the error to its request."""
    status = status_of(exc)
    text = status.message
    if request is not None and request.id:
        text = f"id '{echoed(request.id)}': {text}"
    response = pb.ModelStreamInferResponse(error_message=text)
    inner = response.infer_response
    if request is not None:
        inner.id, inner.model_name = request.id, request.model_name
        inner.model_version = request.model_version
    inner.parameters[CODE_PARAMETER].string_param = status.code.name
    for key, value in status.trailers.items():
        inner.parameters[key].string_param = value
    return response.SerializeToString(), status.code.name


def _parameter(request: pb.ModelInferRequest, name: str) -> str | None:
    if name not in request.parameters:
        return None
    value = request.parameters[name]
    return value.string_param if value.WhichOneof("parameter_choice") == "string_param" else None


class _End(Exception):
    """Ends the whole stream with a status (revoked key, shutdown, a failed transport)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Outbox:
    """The answers a stream has ready to write, in completion order, and the one waiter
    (the writer): cheaper per answer than an asyncio.Queue. None marks the end of a
    half-closed stream; an _End goes first and ends it at once."""

    __slots__ = ("ended", "items", "waiter")

    def __init__(self) -> None:
        self.items: collections.deque[bytes | _End | None] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.ended = False

    def put(self, item: bytes | None) -> None:
        self.items.append(item)
        self._wake()

    def end(self, end: _End) -> None:
        if not self.ended:
            self.ended = True
            self.items.appendleft(end)
            self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> bytes | _End | None:
        items = self.items
        while not items:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return items.popleft()


class StreamInfer:
    """The ModelStreamInfer behavior the edge wraps (it authenticates the stream once; the
    stream holds no in-flight slot, its messages each take one of ``inflight`` while they
    run). Registered with no (de)serializers: each message is parsed here, so one that does
    not parse is answered in-stream instead of ending it."""

    def __init__(
        self, pipeline: InferencePipeline, codecs: Codecs, observer: StreamObserver,
        authenticator: Authenticator, max_inflight: int, *,
        inflight: InflightLimit | None = None, max_open: int = 0, idle_s: float = 0.0,
        max_message_bytes: int = DEFAULT_MESSAGE_BYTES, memory: SharedMemory | None = None,
    ) -> None:
        self._max_message = max_message_bytes  # a compressed message's inflated limit
        self._memory = memory  # system shared memory, for messages that name regions
        self._pipeline = pipeline
        self._codecs = codecs
        self._observer = observer
        self._authenticator = authenticator
        self._max_inflight = max_inflight
        self._inflight = inflight
        self._max_open = max_open  # streams open at once (0: any)
        self._idle_s = idle_s  # a stream with nothing in flight this long ends (0: never)
        self._open: set[_Stream] = set()
        self._none_open: asyncio.Event | None = None  # set when the last stream ends

    @property
    def open_streams(self) -> int:
        return len(self._open)

    async def close_after(self, grace_s: float) -> None:
        """Shutdown: open streams get ``grace_s`` (less a margin, so they end before the
        server cancels what is left), then end UNAVAILABLE. Returns once none is open."""
        if self._open:
            self._none_open = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._none_open.wait(),
                                       max(0.0, grace_s - min(0.25, grace_s / 4)))
        for stream in list(self._open):
            stream.outbox.end(_End(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN))

    async def __call__(self, requests: AsyncIterator[bytes], context: Context
                       ) -> AsyncIterator[bytes]:
        if self._max_open and len(self._open) >= self._max_open:
            raise OverloadedError(
                f"the gateway is at its limit of {self._max_open} open streams; retry shortly",
                trailers={RETRY_AFTER_KEY: _OPEN_RETRY_MS},
            )
        caller = caller_of(context)
        # The tenant's ``streams`` limit: refused RESOURCE_EXHAUSTED (modelgate-limit:
        # streams); the held stream is given back however the stream ends.
        try:
            held = await self._pipeline.quota.open_stream(caller.tenant.stream_scopes())
        except QuotaExceededError as exc:
            self._observer.refused_stream(caller.tenant.id, exc)
            raise
        stream = _Stream(self, caller, tuple(context.invocation_metadata() or ()), context)
        self._open.add(stream)
        try:
            async for answer in stream.run(requests):
                yield answer
        finally:
            held.release()
            self._open.discard(stream)
            if not self._open and self._none_open is not None:
                self._none_open.set()


class _Stream:
    """One open stream: a reader that takes messages while fewer than the bound are in
    flight, a task per message, and the handler's generator yielding answers as they
    complete (grpc writes each before asking for the next)."""

    def __init__(self, owner: StreamInfer, caller: RequestContext, metadata: tuple[Any, ...],
                 context: Context) -> None:
        self.owner = owner
        self.tenant: Tenant = caller.tenant
        self.metadata = metadata
        self.context = context
        self.outbox = _Outbox()
        self.label, self.routing_key, self.trace_headers = request_metadata(metadata)
        remaining = context.time_remaining()
        self.deadline = None if remaining is None else time.monotonic() + remaining
        registry = owner._authenticator.registry
        self.tenants_seen = registry.tenants if registry is not None else None
        self.places = asyncio.Semaphore(owner._max_inflight)
        self.tasks: set[asyncio.Task[None]] = set()
        self.messages = 0
        self.trace: StreamTrace | None = None
        self.peer: str | None = None
        self.active = time.monotonic()  # the last message read or answer taken
        self.idle_timer: asyncio.TimerHandle | None = None

    async def run(self, requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        self.trace = self.owner._observer.open_stream(self.metadata, self.tenant.id)
        reader = asyncio.create_task(self._read(requests))
        # Only a gateway with a tenants file has keys to revoke.
        watcher = (asyncio.create_task(self._watch()) if self.tenants_seen is not None
                   else None)
        if self.owner._idle_s:
            self.idle_timer = asyncio.get_running_loop().call_later(
                self.owner._idle_s, self._idle_check)
        code = "OK"
        outbox, places = self.outbox, self.places
        try:
            while True:
                answer = await outbox.get()
                if answer is None:
                    break
                if isinstance(answer, _End):
                    code = answer.code.name
                    await self.context.abort(answer.code, answer.message)
                    break
                yield answer
                # Released once grpc took the answer: a client that reads no answers stops
                # the reader after max_inflight messages, so what a stream holds is bounded.
                places.release()
                self.active = time.monotonic()
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        except BaseException:
            code = "UNKNOWN" if code == "OK" else code
            raise
        finally:
            # Cancel or disconnect: queued messages leave the batcher unrun (their futures
            # are cancelled), running ones finish in their instance and are dropped.
            if watcher is not None:
                watcher.cancel()
            if self.idle_timer is not None:
                self.idle_timer.cancel()
            reader.cancel()
            for task in list(self.tasks):
                task.cancel()
            self.owner._observer.close_stream(self.trace, code, self.messages)

    async def _read(self, requests: AsyncIterator[bytes]) -> None:
        places, tasks = self.places, self.tasks
        iterator = requests.__aiter__()
        try:
            while True:
                await places.acquire()
                try:
                    raw = await iterator.__anext__()
                except StopAsyncIteration:
                    places.release()
                    break
                self.messages += 1
                self.active = time.monotonic()
                task = asyncio.create_task(self._one(raw))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            # Half-close: the messages in flight finish, then the stream ends OK.
            while tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            self.outbox.put(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The transport failed under the reader (a reset stream): end with its status.
            status = status_of(exc)
            self.outbox.end(_End(status.code, status.message))

    def _idle_check(self) -> None:
        """End the stream once nothing has been in flight for ``idle_s``: a stream that
        sends nothing must not hold its place (per connection, server, tenant) for ever."""
        idle_s = self.owner._idle_s
        quiet = time.monotonic() - self.active
        if self.tasks or self.outbox.items or quiet < idle_s:
            delay = idle_s - quiet if quiet < idle_s else idle_s
            self.idle_timer = asyncio.get_running_loop().call_later(delay, self._idle_check)
            return
        self.idle_timer = None
        self.outbox.end(_End(grpc.StatusCode.UNAVAILABLE, idle_message(idle_s)))

    async def _watch(self) -> None:
        """Re-check the stream's key whenever the tenants in force change (a reload), also
        while the stream is idle."""
        registry = self.owner._authenticator.registry
        if registry is None:
            return
        while True:
            await asyncio.sleep(_REVOCATION_POLL_S)
            self._recheck()

    def _recheck(self) -> None:
        registry = self.owner._authenticator.registry
        if registry is None or registry.tenants is self.tenants_seen:
            return
        self.tenants_seen = registry.tenants
        try:
            self.tenant = self.owner._authenticator.authenticate(
                self.metadata, lambda: peer_subject(self.context))
        except AuthenticationError:
            self.outbox.end(_End(grpc.StatusCode.UNAUTHENTICATED, REVOKED))

    def _peer(self) -> str:
        if self.peer is None:
            self.peer = self.context.peer()
        return self.peer

    async def _one(self, raw: bytes) -> None:
        """One message: parse, run through the pipeline, queue its answer."""
        owner = self.owner
        if self.tenants_seen is not None:
            self._recheck()
        if self.outbox.ended:
            return
        request: pb.ModelInferRequest | None
        refused: GatewayError | None = None  # compressed, and not within the limit
        try:
            request = pb.ModelInferRequest.FromString(inflated(raw, owner._max_message))
        except GatewayError as exc:
            request, refused = None, exc
        except Exception:  # any parse failure is the client's bytes
            request = None
        # Most messages carry no parameters: one test instead of three map lookups.
        parameters = request is not None and len(request.parameters) > 0
        traceparent = (_parameter(request, TRACEPARENT)
                       if parameters and request is not None else None)
        observer = owner._observer
        observation = observer.open_message(self.trace, self.tenant.id, traceparent,
                                       request.model_name if request is not None else "")
        error: BaseException | None = None
        code = "OK"
        limit, started = owner._inflight, None
        try:
            if request is None:
                raise refused or InvalidRequestError(
                    "the message is not a valid ModelInferRequest")
            if limit is not None:  # each message in flight counts, as a unary call does
                started = limit.enter()
            answer = await self._infer(request, observation, traceparent, parameters)
        except asyncio.CancelledError as exc:
            # The stream went away: nothing to answer, but the message is still counted.
            observer.close_message(observation, "CANCELLED", exc, self._peer(),
                                   _asked(request))
            raise
        except Exception as exc:
            error = exc
            answer, code = error_answer(exc, request)
        finally:
            if started is not None and limit is not None:
                limit.leave(started)
        observer.close_message(observation, code, error, self.peer or self._peer(),
                               _asked(request))
        self.outbox.put(answer)

    async def _infer(self, request: pb.ModelInferRequest, observation: Observation,
                     traceparent: str | None, parameters: bool) -> bytes:
        label, routing_key, trace_headers = self.label, self.routing_key, self.trace_headers
        if parameters:  # a message's own label, routing key and trace context come first
            label = _parameter(request, LABEL_KEY) or label
            routing_key = _parameter(request, ROUTING_KEY) or routing_key
            if traceparent:
                trace_headers = {**trace_headers, TRACEPARENT: traceparent}
        context = RequestContext(self.tenant, "grpc_stream", label, routing_key,
                                 self.deadline, trace_headers=trace_headers,
                                 observation=observation)
        codecs = self.owner._codecs
        shared = self.owner._memory
        memory = None if shared is None else shared.of(self.tenant.id)
        inference = await self.owner._pipeline.infer(
            context, request.model_name, request.model_version, codecs.decode(request, memory))
        started = time.perf_counter_ns()
        answer = wrap_answer(codecs.encode(request, inference, memory))
        record_encoding(inference.version.statistics, started)
        return answer


def idle_message(idle_s: float) -> str:
    """What a stream ended for idleness is told."""
    return (f"the stream had no message in flight for {idle_s:g} s (stream_idle_s); "
            "open a new stream to send more")


def _asked(request: pb.ModelInferRequest | None) -> tuple[str, str]:
    return ("", "") if request is None else (request.model_name, request.model_version)


def stream_handler(behavior: StreamInfer) -> grpc.RpcMethodHandler[Any, Any]:
    """The handler registered for ModelStreamInfer: bytes in and out (see StreamInfer)."""
    return grpc.stream_stream_rpc_method_handler(behavior, None, None)
