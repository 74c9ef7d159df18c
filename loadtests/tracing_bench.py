"""The throughput cost of tracing: the same closed-loop load against ``modelgate serve`` with
tracing off, at 1 % and at 100 % sampling, exporting to an in-process OTLP sink.

    .venv/bin/python -m loadtests.tracing_bench --models digits,digits_unbatched \
        --concurrency 16 --duration 5"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import threading
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent import futures
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as ts_grpc
from prometheus_client.parser import text_string_to_metric_families

from gateway.settings import demo_store
from loadtests.results import LevelResult
from loadtests.runner import LevelPlan, run_levels
from loadtests.servers import start_gateway

# (label, extra serve flags without the endpoint; None ratio = tracing off)
MODES: tuple[tuple[str, float | None], ...] = (("off", None), ("1%", 0.01), ("100%", 1.0))


class SpanSink(ts_grpc.TraceServiceServicer):
    """An OTLP/gRPC collector that only counts what it receives."""

    def __init__(self) -> None:
        self.spans = 0
        self._lock = threading.Lock()

    def Export(
        self, request: ts.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> ts.ExportTraceServiceResponse:
        count = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        with self._lock:
            self.spans += count
        return ts.ExportTraceServiceResponse()


@contextlib.contextmanager
def span_sink() -> Iterator[tuple[str, SpanSink]]:
    """A SpanSink served on a free loopback port: yields (OTLP endpoint URL, sink)."""
    sink = SpanSink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    ts_grpc.add_TraceServiceServicer_to_server(sink, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", sink
    finally:
        server.stop(1)


def run(
    models: Sequence[str], concurrency: int, duration_s: float, warmup_s: float, *,
    store: Path, rounds: int = 1,
) -> list[dict[str, object]]:
    """Every mode once per round, rounds interleaved so drifting machine load hits every
    mode alike."""
    sink = SpanSink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    ts_grpc.add_TraceServiceServicer_to_server(sink, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    rows: list[dict[str, object]] = []
    try:
        for label, ratio in [m for _ in range(rounds) for m in MODES]:
            extra: list[str] = []
            if ratio is not None:
                extra = ["--otlp-endpoint", f"http://127.0.0.1:{port}",
                         "--trace-sampling-ratio", str(ratio)]
            before = sink.spans
            with start_gateway(store, extra) as served:
                cpu0, answered0 = _cpu_and_requests(served.metrics_port)
                results: list[LevelResult] = asyncio.run(run_levels(
                    served.target, models, [concurrency], [],
                    LevelPlan(duration_s, warmup_s),
                ))
                cpu1, answered1 = _cpu_and_requests(served.metrics_port)
            for result in results:
                summary = result.summary()
                rows.append({"tracing": label, **summary})
            # CPU per request is what tracing costs; unlike req/s it barely moves when
            # other work shares the machine.
            cpu_us = 1e6 * (cpu1 - cpu0) / max(1.0, answered1 - answered0)
            rows.append({"tracing": label, "spans_received": sink.spans - before,
                         "gateway_cpu_us_per_request": round(cpu_us, 1)})
    finally:
        server.stop(0)
    return rows



def _cpu_and_requests(metrics_port: int) -> tuple[float, float]:
    """The gateway's CPU seconds and answered inference RPCs, from its /metrics."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read().decode()
    cpu = answered = 0.0
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == "process_cpu_seconds_total":
                cpu = sample.value
            elif sample.name == "modelgate_inference_requests_total":
                answered += sample.value
    return cpu, answered


def format_table(rows: Sequence[dict[str, object]]) -> str:
    lines = ["| tracing | model | req/s | p50 ms | p99 ms | mean batch | errors |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "model" not in row:
            continue
        lines.append(
            f"| {row['tracing']} | {row['model']} | {row['requests_per_s']} | "
            f"{row['p50_ms']} | {row['p99_ms']} | {row['mean_batch']} | "
            f"{sum(dict(row['errors']).values()) if row['errors'] else 0} |"  # type: ignore[call-overload]
        )
    return "\n".join(lines)


def format_summary(rows: Sequence[dict[str, object]]) -> str:
    """Mean req/s per (model, mode) over the rounds, and the change against tracing off."""
    totals: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        if "model" in row:
            key = (str(row["model"]), str(row["tracing"]))
            totals.setdefault(key, []).append(float(row["requests_per_s"]))  # type: ignore[arg-type]
    cpu: dict[str, list[float]] = {}
    for row in rows:
        if "gateway_cpu_us_per_request" in row:
            cpu.setdefault(str(row["tracing"]), []).append(
                float(row["gateway_cpu_us_per_request"])  # type: ignore[arg-type]
            )
    lines = ["| tracing | gateway CPU µs per request (mean of rounds) |", "|---|---:|"]
    lines += [f"| {label} | {sum(v) / len(v):.0f} |" for label, v in cpu.items()]
    lines += ["", "| model | tracing | mean req/s | vs off |", "|---|---|---:|---:|"]
    for (model, label), values in totals.items():
        mean = sum(values) / len(values)
        off = totals.get((model, "off"))
        base = sum(off) / len(off) if off else mean
        lines.append(f"| {model} | {label} | {mean:.1f} | {100 * (mean / base - 1):+.1f} % |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tracing_bench", description=__doc__)
    parser.add_argument("--models", default="digits")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--store", type=Path, default=demo_store())
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    rows = run(args.models.split(","), args.concurrency, args.duration, args.warmup,
               store=args.store, rounds=args.rounds)
    print(format_table(rows))
    print(format_summary(rows))
    for row in rows:
        if "spans_received" in row:
            print(f"tracing {row['tracing']}: {row['spans_received']} spans received")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
