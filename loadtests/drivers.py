"""Load drivers for the benchmark runner: closed loop (fixed concurrency), open loop (fixed
arrival rate) and stream loop (ModelStreamInfer streams with many messages in flight each)
over grpc.aio, the measurement window they fill, and percentiles."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc

from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) with linear interpolation between ranks; nan if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Window:
    """The measured requests: those that start after the warm-up and before the end. A
    closed loop also drops those finishing after the end (its callers stop there); an open
    loop keeps them, since its late answers are the very queueing it measures."""

    start: float
    end: float
    keep_late: bool = False
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    last_finish: float = 0.0

    @property
    def span(self) -> float:
        """Seconds from the start to the end, or to the last kept answer if later."""
        return max(self.end, self.last_finish) - self.start

    def record(self, began: float, finished: float, error: str | None) -> None:
        if not self.start <= began < self.end or (finished > self.end and not self.keep_late):
            return
        self.last_finish = max(self.last_finish, finished)
        if error is None:
            self.latencies.append(finished - began)
        else:
            self.errors[error] += 1


Metadata = tuple[tuple[str, str], ...]


@contextlib.asynccontextmanager
async def channels_on(target: str, channels: int) -> AsyncIterator[list[grpc.aio.Channel]]:
    """``channels`` client channels, closed afterwards. Each gets its own subchannel pool:
    grpc otherwise shares one TCP connection among all channels to a target, which would
    pin every caller to one worker of a multi-process server."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    opened = [grpc.aio.insecure_channel(target, options=options) for _ in range(channels)]
    try:
        yield opened
    finally:
        for channel in opened:
            await channel.close(None)


@contextlib.asynccontextmanager
async def stubs_on(
    target: str, channels: int
) -> AsyncIterator[list[pb_grpc.GRPCInferenceServiceStub]]:
    """Stubs on ``channels`` client channels (channels_on), closed afterwards."""
    async with channels_on(target, channels) as opened:
        yield [pb_grpc.GRPCInferenceServiceStub(c) for c in opened]


async def _call(
    stub: pb_grpc.GRPCInferenceServiceStub,
    request: pb.ModelInferRequest,
    deadline_s: float,
    metadata: Metadata | None,
) -> str | None:
    try:
        await stub.ModelInfer(request, timeout=deadline_s, metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return None


async def closed_loop(
    stubs: Sequence[pb_grpc.GRPCInferenceServiceStub],
    request: pb.ModelInferRequest,
    concurrency: int,
    *,
    duration_s: float,
    warmup_s: float = 1.0,
    timeout_s: float = 30.0,
    metadata: Metadata | None = None,
) -> Window:
    """``concurrency`` callers, each sending its next request when the last one answers."""
    now = time.perf_counter()
    window = Window(now + warmup_s, now + warmup_s + duration_s)

    async def caller(index: int) -> None:
        stub = stubs[index % len(stubs)]
        while (began := time.perf_counter()) < window.end:
            error = await _call(stub, request, timeout_s, metadata)
            window.record(began, time.perf_counter(), error)

    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    return window


async def open_loop(
    stubs: Sequence[pb_grpc.GRPCInferenceServiceStub],
    request: pb.ModelInferRequest,
    rate: float,
    *,
    duration_s: float,
    warmup_s: float = 1.0,
    timeout_s: float = 30.0,
    metadata: Metadata | None = None,
) -> Window:
    """Requests sent on a fixed schedule of ``rate`` per second whether or not earlier ones
    answered; latency counts from the scheduled send time, so a stalled server's queueing
    is measured rather than hidden (no coordinated omission)."""
    now = time.perf_counter()
    window = Window(now + warmup_s, now + warmup_s + duration_s, keep_late=True)
    tasks: set[asyncio.Task[None]] = set()

    async def one(stub: pb_grpc.GRPCInferenceServiceStub, scheduled: float) -> None:
        error = await _call(stub, request, timeout_s, metadata)
        window.record(scheduled, time.perf_counter(), error)

    interval = 1.0 / rate
    index = 0
    while (scheduled := now + index * interval) < window.end:
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(stubs[index % len(stubs)], scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        index += 1
    if tasks:
        await asyncio.gather(*tasks)
    return window


STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
_ID_TAG = bytes([pb.ModelInferRequest.DESCRIPTOR.fields_by_name["id"].number << 3 | 2])


def with_id(serialized: bytes, message_id: str) -> bytes:
    """``serialized`` (a ModelInferRequest) with its id set to ``message_id``: protobuf
    takes the last occurrence of a field, so appending one sets it without a re-encode."""
    raw = message_id.encode()
    if len(raw) > 127:
        raise ValueError("message ids here are short decimal counters")
    return serialized + _ID_TAG + bytes([len(raw)]) + raw


async def stream_loop(
    channels: Sequence[grpc.aio.Channel],
    request: pb.ModelInferRequest,
    streams: int,
    in_flight: int,
    *,
    duration_s: float,
    warmup_s: float = 1.0,
    timeout_s: float = 60.0,
    metadata: Metadata | None = None,
) -> Window:
    """``streams`` ModelStreamInfer streams, each keeping ``in_flight`` messages sent and
    not yet answered: a message goes out as soon as an answer frees a place. Latency is per
    message, send to answer (matched by id). An in-stream error counts under its message;
    a stream that fails counts its unanswered messages under the status code."""
    now = time.perf_counter()
    window = Window(now + warmup_s, now + warmup_s + duration_s)
    serialized = request.SerializeToString()

    async def stream(index: int) -> None:
        channel = channels[index % len(channels)]
        method = channel.stream_stream(STREAM_METHOD, None, None)
        call = method(None, metadata=metadata, timeout=timeout_s)
        places = asyncio.Semaphore(in_flight)
        sent: dict[str, float] = {}

        async def write() -> None:
            counter = 0
            while (began := time.perf_counter()) < window.end:
                await places.acquire()
                began = time.perf_counter()
                message_id = str(counter)
                counter += 1
                sent[message_id] = began
                await call.write(with_id(serialized, message_id))
            await call.done_writing()

        writer = asyncio.create_task(write())
        try:
            async for raw in call:
                answer = pb.ModelStreamInferResponse.FromString(raw)
                began = sent.pop(answer.infer_response.id, None)
                if began is None and sent:
                    # An answer without the id (Triton's errors, the no-op server's fixed
                    # bytes) is taken as the oldest message's: those servers answer in order.
                    began = sent.pop(next(iter(sent)))
                if began is None:
                    window.errors["unmatched answer"] += 1
                    continue
                places.release()
                window.record(began, time.perf_counter(),
                              "in-stream error" if answer.error_message else None)
            await writer
        except grpc.aio.AioRpcError as exc:
            writer.cancel()
            finished = time.perf_counter()
            for began in sent.values():
                window.record(began, finished, exc.code().name)

    await asyncio.gather(*(stream(i) for i in range(streams)))
    return window
