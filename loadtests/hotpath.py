"""The gateway's own request path, measured without gRPC: the real Gateway's edge-wrapped
ModelInfer (or, with --stream, ModelStreamInfer) handler called in-process by closed-loop
callers; prints the event loop thread's CPU time per request (robust to a busy machine, unlike
throughput) and, with --profile, a cProfile of it. What gRPC itself costs per call is the no-op
server's business.

    .venv/bin/python -m loadtests.hotpath --model digits --concurrency 32 --requests 20000
"""

from __future__ import annotations

import contextlib
import cProfile
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import grpc

from gateway.process import event_loop
from gateway.process.server import Gateway
from gateway.settings import Settings, demo_store
from loadtests import loop_cpu
from loadtests.loop_cpu import Round, timed_round
from loadtests.requests import request_for
from loadtests.tracing_bench import span_sink
from modelgate_pb import grpc_service_pb2 as pb

METHOD = "/inference.GRPCInferenceService/ModelInfer"
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"


class _Context:
    """The few ServicerContext calls the inference path makes, answered locally."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata
        self._code: grpc.StatusCode | None = None
        self._trailers: tuple[tuple[str, str], ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def set_trailing_metadata(self, metadata: Any) -> None:
        self._trailers = tuple(metadata)

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailers

    def auth_context(self) -> dict[str, Any]:
        return {}

    async def abort(self, code: grpc.StatusCode, details: str = "", *_: Any) -> None:
        self._code = code
        raise RuntimeError(f"{code.name}: {details}")


async def measure(settings: Settings, model: str, *, concurrency: int, requests: int,
                  rounds: int, rows: int, key: str | None,
                  profile: cProfile.Profile | None, stream: bool = False) -> list[Round]:
    gateway = Gateway(settings)
    await gateway.start()
    try:
        handler = gateway.edge_handlers[METHOD]
        behavior: Any = handler.unary_unary
        decode, encode = handler.request_deserializer, handler.response_serializer
        assert decode is not None and encode is not None
        metadata = (("authorization", f"Bearer {key}"),) if key else ()
        spec = gateway.manager.model(model).spec
        assert spec is not None
        answer = pb.ModelMetadataResponse(name=model)
        for tensor in spec.inputs:
            answer.inputs.add(name=tensor.name, datatype=tensor.datatype.value,
                              shape=spec.full_shape(tensor))
        wire = request_for(answer, batch=rows).SerializeToString()

        async def caller(count: int) -> None:
            for _ in range(count):
                encode(await behavior(decode(wire), _Context(metadata)))

        if stream:  # each caller is one stream carrying its share of the messages
            streamed: Any = gateway.edge_handlers[STREAM_METHOD].stream_stream

            async def messages(count: int) -> Any:
                for _ in range(count):
                    yield wire

            async def caller(count: int) -> None:
                async for answer in streamed(messages(count), _Context(metadata)):
                    assert answer.__class__ is bytes

        results = []
        for _ in range(rounds):
            served = gateway.manager.version(model, "").id
            counted = gateway.metrics.exec_count.labels(model, str(served.version))
            before = counted.value
            result = await timed_round(caller, concurrency=concurrency, requests=requests,
                                       profile=profile)
            result.batches = int(counted.value - before)
            results.append(result)
        return results
    finally:
        await gateway.stop(grace=0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = loop_cpu.parser("python -m loadtests.hotpath", __doc__, model_help=None,
                             concurrency=32, requests=20000)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--redis-url", default="", help="charge the tenants' quotas in Redis")
    parser.add_argument("--trace-ratio", type=float, default=None,
                        help="trace this share of requests, exported to an in-process sink")
    parser.add_argument("--stream", action="store_true",
                        help="ModelStreamInfer: --concurrency streams, each carrying its share "
                        "of --requests (stream_max_inflight in flight per stream)")
    args = parser.parse_args(argv)
    if min(args.concurrency, args.requests, args.rounds, args.rows) < 1:
        parser.error("--concurrency, --requests, --rounds and --rows must be positive")
    settings = dataclasses.replace(
        Settings(), store=args.store or demo_store(), grpc_port=0, metrics_port=0,
        tenants=args.tenants, redis_url=args.redis_url, log_level="WARNING",
        monitoring=args.monitoring,
    )
    profile = cProfile.Profile() if args.profile else None
    with contextlib.ExitStack() as stack:
        if args.trace_ratio is not None:
            endpoint, _ = stack.enter_context(span_sink())
            settings = dataclasses.replace(settings, otlp_endpoint=endpoint,
                                           trace_sampling_ratio=args.trace_ratio)
        rounds = event_loop.run(
            measure(settings, args.model, concurrency=args.concurrency,
                    requests=args.requests, rounds=args.rounds, rows=args.rows, key=args.key,
                    profile=profile, stream=args.stream),
            args.event_loop,
        )
    for result in rounds:
        print(result.line(args.model, args.concurrency))
    loop_cpu.print_profile(profile, args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
