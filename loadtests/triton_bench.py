"""Gateway -> Triton against direct Triton: the same closed-loop load (our grpc.aio stubs, the
same request, the same concurrency) on a Triton model directly and through a gateway that
serves it from that upstream; reports throughput and the latency the gateway adds.

    .venv/bin/python -m loadtests.triton_bench --concurrency 1,8,32 --duration 5

Without --upstream it starts a tritonserver from .triton-venv (scripts/install_test_deps.sh
installs it) over the test repository of tests/support/triton_server.py."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from loadtests.drivers import closed_loop, percentile
from loadtests.requests import request_for, require_loopback
from loadtests.servers import gateway_process
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc

CHANNELS = 4  # spread callers over a few HTTP/2 connections, as real clients are


@dataclass(frozen=True)
class Measured:
    """One level on one path (direct or gateway)."""

    path: str
    concurrency: int
    requests: int
    errors: dict[str, int]
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float

    @property
    def throughput(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


@contextlib.contextmanager
def _upstream(given: str | None, model: str) -> Iterator[str]:
    if given is not None:
        yield require_loopback(given)
        return
    # Imported here: only a checkout with the test support has it.
    from tests.support.triton_server import triton_servers

    with triton_servers(1, (model,)) as (server,):
        yield server.target


async def _measure(target: str, path: str, request: pb.ModelInferRequest, concurrency: int,
                   *, duration_s: float, warmup_s: float) -> Measured:
    channels = [grpc.aio.insecure_channel(target) for _ in range(CHANNELS)]
    try:
        stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]
        window = await closed_loop(stubs, request, concurrency, duration_s=duration_s,
                                   warmup_s=warmup_s)
    finally:
        for channel in channels:
            await channel.close(None)
    lat = window.latencies
    return Measured(path, concurrency, len(lat), dict(window.errors), duration_s,
                    *(round(percentile(lat, p) * 1000, 3) for p in (50.0, 90.0, 99.0)))


async def _metadata(target: str, model: str) -> pb.ModelMetadataResponse:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        reply: pb.ModelMetadataResponse = await stub.ModelMetadata(
            pb.ModelMetadataRequest(name=model), timeout=30)
        return reply


async def run(upstream: str, gateway: str, model: str, *, rows: int, levels: Sequence[int],
              duration_s: float, warmup_s: float) -> list[tuple[Measured, Measured]]:
    """Each level direct, then through the gateway (same request, same concurrency)."""
    request = request_for(await _metadata(upstream, model), batch=rows)
    results = []
    for concurrency in levels:
        direct = await _measure(upstream, "direct", request, concurrency,
                                duration_s=duration_s, warmup_s=warmup_s)
        through = await _measure(gateway, "gateway", request, concurrency,
                                 duration_s=duration_s, warmup_s=warmup_s)
        results.append((direct, through))
        print(_row(direct, through), flush=True)
    return results


HEADER = (
    "| concurrency | direct req/s | gateway req/s | gateway/direct | direct p50 / p99 ms "
    "| gateway p50 / p99 ms | added p50 ms |\n|---|---|---|---|---|---|---|"
)


def _row(direct: Measured, through: Measured) -> str:
    ratio = through.throughput / direct.throughput if direct.throughput else 0.0
    errors = f" (errors: {direct.errors} / {through.errors})" if (
        direct.errors or through.errors) else ""
    return (
        f"| {direct.concurrency} | {direct.throughput:.0f} | {through.throughput:.0f} "
        f"| {ratio:.2f} | {direct.p50_ms:.2f} / {direct.p99_ms:.2f} "
        f"| {through.p50_ms:.2f} / {through.p99_ms:.2f} "
        f"| {through.p50_ms - direct.p50_ms:.2f} |{errors}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--upstream", help="a running Triton (loopback HOST:PORT); default: "
                        "start one")
    parser.add_argument("--model", default="add", help="the upstream's model (default: add; "
                        "a started server has add, add_slow, all_types, all_types_typed)")
    parser.add_argument("--rows", type=int, default=1, help="rows per request (default 1)")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per level/path")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds not counted")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    with _upstream(args.upstream, args.model) as upstream, tempfile.TemporaryDirectory() as store:
        # An empty store: the gateway serves the upstream's models (export=all).
        extra = ["--triton", f"up={upstream},export=all"]
        with gateway_process(Path(store), extra) as gateway:
            print(f"upstream {upstream}, gateway {gateway}, model {args.model}, "
                  f"rows {args.rows}, {args.duration:g} s per level\n{HEADER}", flush=True)
            results = asyncio.run(run(upstream, gateway, args.model, rows=args.rows,
                                      levels=levels, duration_s=args.duration,
                                      warmup_s=args.warmup))
    if args.json is not None:
        data = [{"direct": vars(d), "gateway": vars(g)} for d, g in results]
        args.json.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
