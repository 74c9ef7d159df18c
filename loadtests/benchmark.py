"""The project's benchmark runner: drives a gateway on loopback closed-loop (fixed
concurrency) or open-loop (fixed arrival rate) with our own grpc.aio stubs, measures
throughput and latency percentiles, and the in-process ONNX Runtime ceiling of each model.

    .venv/bin/python -m loadtests.benchmark --models digits,digits_unbatched \
        --concurrency 1,8,32,128 --duration 5 --json benchmark.json

Without --target it starts ``modelgate serve`` on a free loopback port (the demo store)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from loadtests.drivers import Window, closed_loop, open_loop, percentile
from loadtests.noop_server import noop_process
from loadtests.requests import request_for, require_loopback
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc

# Other benchmarks (triton_bench, quota_bench) build on these.
__all__ = [
    "LevelResult",
    "Window",
    "closed_loop",
    "format_table",
    "gateway_process",
    "open_loop",
    "ort_ceiling",
    "percentile",
    "run_levels",
]

PERCENTILES = (50.0, 90.0, 99.0)


# ---- measuring --------------------------------------------------------------------------


@dataclass
class LevelResult:
    """One measured load level of one model."""

    model: str
    mode: str  # "closed" (fixed concurrency) or "open" (fixed arrival rate)
    load: float  # concurrency, or requests per second offered
    rows_per_request: int
    duration_s: float
    latencies_s: list[float] = field(default_factory=list, repr=False)
    errors: dict[str, int] = field(default_factory=dict)
    executions: int | None = None  # batches the server ran during the level, if known
    inferences: int | None = None

    @property
    def requests(self) -> int:
        return len(self.latencies_s)

    @property
    def throughput(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def mean_batch(self) -> float | None:
        if not self.executions or self.inferences is None:
            return None
        return self.inferences / self.executions

    def latency_ms(self, p: float) -> float:
        return percentile(self.latencies_s, p) * 1000

    def summary(self) -> dict[str, object]:
        data = {k: v for k, v in asdict(self).items() if k != "latencies_s"}
        data.update(
            requests=self.requests,
            requests_per_s=round(self.throughput, 1),
            rows_per_s=round(self.throughput * self.rows_per_request, 1),
            mean_batch=None if self.mean_batch is None else round(self.mean_batch, 2),
            **{f"p{p:g}_ms": round(self.latency_ms(p), 3) for p in PERCENTILES},
        )
        return data


def ort_ceiling(model_file: Path, rows: int, duration_s: float, threads: int = 1) -> float:
    """Rows per second of ONNX Runtime itself on ``rows``-row batches in this process (the
    gateway's own session options: CPU unless CUDA works, ``threads`` intra-op threads)."""
    from runtimes.onnx_runtime import providers_for

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_file), options, providers=list(providers_for("auto")))
    rng = np.random.default_rng(0)
    feeds = {}
    for tensor in session.get_inputs():
        shape = [
            rows if i == 0 else (d if isinstance(d, int) else 1) for i, d in enumerate(tensor.shape)
        ]
        feeds[tensor.name] = rng.uniform(0, 16, size=shape).astype(np.float32)
    for _ in range(20):
        session.run(None, feeds)
    runs = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < duration_s:
        session.run(None, feeds)
        runs += 1
    return runs * rows / elapsed


# ---- the gateway under test ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def served_gateway(
    store: Path | None, extra: Sequence[str] = ()
) -> Iterator[tuple[str, int]]:
    """``modelgate serve`` on a free loopback port (the demo store when ``store`` is None);
    yields (target, pid) once ready, and stops it afterwards."""
    port = _free_port()
    command = [sys.executable, "-m", "gateway.cli", "serve", "--host", "127.0.0.1",
               "--grpc-port", str(port), "--metrics-port", str(_free_port()),
               "--log-level", "WARNING", *(["--store", str(store)] if store else []), *extra]
    proc = subprocess.Popen(command)
    target = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            give_up = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"gateway exited with {proc.returncode}")
                with contextlib.suppress(grpc.RpcError):
                    if stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready:
                        break
                if time.monotonic() > give_up:
                    raise TimeoutError("gateway not ready after 120 s")
                time.sleep(0.2)
        yield target, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def gateway_process(store: Path, extra: Sequence[str] = ()) -> Iterator[str]:
    """``modelgate serve`` on a free loopback port; yields its target once ready."""
    with served_gateway(store, extra) as (target, _):
        yield target


async def _counts(stub: pb_grpc.GRPCInferenceServiceStub, model: str) -> tuple[int, int] | None:
    """(inference_count, execution_count) of the model's served versions, if reported."""
    try:
        reply = await stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=5)
    except grpc.aio.AioRpcError:
        return None
    return (
        sum(s.inference_count for s in reply.model_stats),
        sum(s.execution_count for s in reply.model_stats),
    )


@contextlib.asynccontextmanager
async def _stubs(
    target: str, channels: int
) -> AsyncIterator[list[pb_grpc.GRPCInferenceServiceStub]]:
    """Stubs on ``channels`` client channels (callers spread over them), closed afterwards."""
    opened = [grpc.aio.insecure_channel(target) for _ in range(channels)]
    try:
        yield [pb_grpc.GRPCInferenceServiceStub(c) for c in opened]
    finally:
        for channel in opened:
            await channel.close(None)


async def run_levels(
    target: str,
    models: Sequence[str],
    concurrencies: Sequence[int],
    rates: Sequence[float],
    *,
    duration_s: float,
    warmup_s: float,
    rows: int = 1,
    channels: int = 4,
) -> list[LevelResult]:
    """Every model at every closed-loop concurrency, then every open-loop rate."""
    results: list[LevelResult] = []
    async with _stubs(target, channels) as stubs:
        for model in models:
            metadata = await stubs[0].ModelMetadata(pb.ModelMetadataRequest(name=model))
            request = request_for(metadata, batch=rows)
            levels = [("closed", float(c)) for c in concurrencies]
            levels += [("open", float(r)) for r in rates]
            for mode, load in levels:
                before = await _counts(stubs[0], model)
                if mode == "closed":
                    window = await closed_loop(
                        stubs, request, int(load), duration_s=duration_s, warmup_s=warmup_s
                    )
                else:
                    window = await open_loop(
                        stubs, request, load, duration_s=duration_s, warmup_s=warmup_s
                    )
                after = await _counts(stubs[0], model)
                result = LevelResult(
                    model, mode, load, rows, window.span, window.latencies, dict(window.errors)
                )
                if before is not None and after is not None:
                    result.inferences = after[0] - before[0]
                    result.executions = after[1] - before[1]
                results.append(result)
                print(_row(result), flush=True)
    return results


async def one_answer(target: str, model: str, rows: int) -> tuple[pb.ModelInferRequest, bytes]:
    """A request for ``model`` and the serialized answer the gateway gives it."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name=model))
        request = request_for(metadata, batch=rows)
        response = await stub.ModelInfer(request)
    return request, response.SerializeToString()


async def run_noop_levels(
    target: str,
    request: pb.ModelInferRequest,
    concurrencies: Sequence[int],
    *,
    duration_s: float,
    warmup_s: float,
    rows: int = 1,
    channels: int = 4,
) -> list[LevelResult]:
    """The no-op server (loadtests.noop_server) at every closed-loop concurrency: the same
    client, request and answer size as the gateway runs, with nothing done in between."""
    results: list[LevelResult] = []
    async with _stubs(target, channels) as stubs:
        for concurrency in concurrencies:
            window = await closed_loop(
                stubs, request, concurrency, duration_s=duration_s, warmup_s=warmup_s
            )
            result = LevelResult(
                NOOP, "closed", float(concurrency), rows, window.span, window.latencies,
                dict(window.errors),
            )
            results.append(result)
            print(_row(result), flush=True)
    return results


NOOP = "no-op server"

# ---- output ---------------------------------------------------------------------------

HEADER = (
    "| model | load | req/s | rows/s | p50 ms | p90 ms | p99 ms | mean batch | errors |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def _row(r: LevelResult) -> str:
    load = f"{int(r.load)} conc" if r.mode == "closed" else f"{r.load:g} req/s offered"
    batch = "-" if r.mean_batch is None else f"{r.mean_batch:.1f}"
    errors = sum(r.errors.values())
    return (
        f"| {r.model} | {load} | {r.throughput:,.0f} | "
        f"{r.throughput * r.rows_per_request:,.0f} | {r.latency_ms(50):.2f} | "
        f"{r.latency_ms(90):.2f} | {r.latency_ms(99):.2f} | {batch} | {errors} |"
    )


def format_table(results: Sequence[LevelResult], ceilings: dict[str, dict[int, float]]) -> str:
    """A Markdown table of the levels, then the in-process ONNX Runtime ceilings."""
    lines = [HEADER, *(_row(r) for r in results), ""]
    lines.append("| in-process ONNX Runtime (ceiling) | rows per run | rows/s |")
    lines.append("|---|---:|---:|")
    for model, by_rows in ceilings.items():
        lines += [f"| {model} | {n} | {v:,.0f} |" for n, v in by_rows.items()]
    return "\n".join(lines)


def _model_file(store: Path, model: str) -> Path:
    versions = sorted((int(p.name), p) for p in (store / model).iterdir() if p.name.isdigit())
    return versions[-1][1] / "model.onnx"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    from gateway.settings import demo_store

    parser = argparse.ArgumentParser(
        prog="python -m loadtests.benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--target",
        help="host:port of a running gateway (loopback only); default: start one on a free port",
    )
    parser.add_argument(
        "--store",
        type=Path,
        default=None,
        help="model store (served when starting a gateway; read for the "
        "ceiling's ONNX files); default: the demo store",
    )
    parser.add_argument("--models", default="digits,digits_unbatched")
    parser.add_argument("--concurrency", default="1,8,32,128", help="closed-loop levels")
    parser.add_argument("--rates", default="", help="open-loop levels, requests per second")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per level")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--rows", type=int, default=1, help="rows per request")
    parser.add_argument("--ceiling-rows", default="1,64", help="batch sizes for the ceiling")
    parser.add_argument("--json", type=Path, help="write every figure here as JSON")
    parser.add_argument(
        "--noop", action=argparse.BooleanOptionalAction, default=True,
        help="also measure a no-op gRPC server on the same stack (the front-end ceiling)",
    )
    args = parser.parse_args(argv)

    store = args.store or demo_store()
    models = [m for m in args.models.split(",") if m]
    if args.duration <= 0 or args.duration > 600:
        parser.error("--duration must lie in (0, 600]")
    with contextlib.ExitStack() as stack:
        target = (
            require_loopback(args.target)
            if args.target
            else stack.enter_context(gateway_process(store))
        )
        results = asyncio.run(
            run_levels(
                target,
                models,
                _ints(args.concurrency),
                [float(r) for r in args.rates.split(",") if r],
                duration_s=args.duration,
                warmup_s=args.warmup,
                rows=args.rows,
            )
        )
        if args.noop:
            request, answer = asyncio.run(one_answer(target, models[0], args.rows))
    if args.noop:
        # After the gateway stopped: the no-op server gets the machine the gateway had.
        with noop_process(_free_port(), answer) as noop:
            results += asyncio.run(
                run_noop_levels(noop, request, _ints(args.concurrency),
                                duration_s=args.duration, warmup_s=args.warmup, rows=args.rows)
            )
    # Measured with the gateway stopped, so the ceiling has the machine to itself.
    ceilings: dict[str, dict[int, float]] = {}
    files: dict[Path, str] = {}
    for model in models:
        path = _model_file(store, model).resolve()
        if path.read_bytes() in {p.read_bytes() for p in files}:
            continue
        files[path] = model
        ceilings[model] = {
            n: ort_ceiling(path, n, min(args.duration, 5.0)) for n in _ints(args.ceiling_rows)
        }
    print()
    print(format_table(results, ceilings))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": {
                        "cpus": os.cpu_count(),
                        "platform": platform.platform(),
                        "python": platform.python_version(),
                        "onnxruntime": ort.__version__,
                    },
                    "settings": {k: str(v) for k, v in vars(args).items()},
                    "levels": [r.summary() for r in results],
                    "ceiling_rows_per_s": ceilings,
                },
                indent=2,
            ),
            encoding="utf-8",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
