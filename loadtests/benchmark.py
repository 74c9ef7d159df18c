"""The project's benchmark runner: drives a gateway on loopback closed-loop (fixed
concurrency) or open-loop (fixed arrival rate) with our own grpc.aio stubs, measures
throughput and latency percentiles, and the in-process ONNX Runtime ceiling of each model.

    .venv/bin/python -m loadtests.benchmark --models digits,digits_unbatched \
        --concurrency 1,8,32,128 --duration 5 --json benchmark.json
    .venv/bin/python -m loadtests.benchmark --suite targets --out docs/benchmark

Without --target it starts ``modelgate serve`` on a free loopback port (the demo store).
``--suite targets`` runs the issue's performance targets in one go (loadtests/suite.py)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
import onnxruntime as ort

from loadtests.ceilings import ort_ceiling
from loadtests.drivers import Metadata, Window, closed_loop, open_loop, percentile, stubs_on
from loadtests.noop_server import noop_process
from loadtests.progress import Progress
from loadtests.requests import request_for, require_loopback
from loadtests.results import HEADER, LevelResult, format_row
from loadtests.servers import free_port, gateway_process, served_gateway, start_gateway
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc

# Other benchmarks (triton_bench, quota_bench, overload, soak) build on these.
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
    "served_gateway",
]

NOOP = "no-op server"


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


async def measure_level(
    stubs: Sequence[pb_grpc.GRPCInferenceServiceStub],
    request: pb.ModelInferRequest,
    model: str,
    mode: str,
    load: float,
    *,
    duration_s: float,
    warmup_s: float,
    statistics: bool = True,
    metadata: Metadata | None = None,
) -> LevelResult:
    """One closed-loop (``load`` callers) or open-loop (``load`` req/s) level; with
    ``statistics``, the batches the server ran come from its ModelStatistics (one worker's
    view only, so multi-worker runs count them elsewhere)."""
    before = await _counts(stubs[0], model) if statistics else None
    if mode == "closed":
        window = await closed_loop(stubs, request, int(load), duration_s=duration_s,
                                   warmup_s=warmup_s, metadata=metadata)
    else:
        window = await open_loop(stubs, request, load, duration_s=duration_s,
                                 warmup_s=warmup_s, metadata=metadata)
    after = await _counts(stubs[0], model) if statistics else None
    rows = request.inputs[0].shape[0] if request.inputs and request.inputs[0].shape else 1
    result = LevelResult(model, mode, load, int(rows), window.span, window.latencies,
                         dict(window.errors))
    if before is not None and after is not None:
        result.inferences = after[0] - before[0]
        result.executions = after[1] - before[1]
    return result


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
    workers: int = 1,
    progress: Progress | None = None,
) -> list[LevelResult]:
    """Every model at every closed-loop concurrency, then every open-loop rate."""
    results: list[LevelResult] = []
    async with stubs_on(target, channels) as stubs:
        for model in models:
            metadata = await stubs[0].ModelMetadata(pb.ModelMetadataRequest(name=model))
            request = request_for(metadata, batch=rows)
            levels = [("closed", float(c)) for c in concurrencies]
            levels += [("open", float(r)) for r in rates]
            for mode, load in levels:
                with Progress.step_of(progress, f"{model} {mode} {load:g}", warmup_s + duration_s):
                    result = await measure_level(
                        stubs, request, model, mode, load, duration_s=duration_s,
                        warmup_s=warmup_s, statistics=workers == 1,
                    )
                result.workers = workers
                results.append(result)
                print(format_row(result), flush=True)
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
    workers: int = 1,
    progress: Progress | None = None,
) -> list[LevelResult]:
    """The no-op server (loadtests.noop_server) at every closed-loop concurrency: the same
    client, request and answer size as the gateway runs, with nothing done in between."""
    results: list[LevelResult] = []
    async with stubs_on(target, channels) as stubs:
        for concurrency in concurrencies:
            with Progress.step_of(progress, f"{NOOP} {concurrency}", warmup_s + duration_s):
                result = await measure_level(
                    stubs, request, NOOP, "closed", concurrency, duration_s=duration_s,
                    warmup_s=warmup_s, statistics=False,
                )
            result.rows_per_request, result.workers = rows, workers
            results.append(result)
            print(format_row(result), flush=True)
    return results


# ---- output ---------------------------------------------------------------------------


def format_table(results: Sequence[LevelResult], ceilings: dict[str, dict[int, float]]) -> str:
    """A Markdown table of the levels, then the in-process ONNX Runtime ceilings."""
    lines = [HEADER, *(format_row(r) for r in results), ""]
    lines.append("| in-process ONNX Runtime (ceiling) | rows per run | rows/s |")
    lines.append("|---|---:|---:|")
    for model, by_rows in ceilings.items():
        lines += [f"| {model} | {n} | {v:,.0f} |" for n, v in by_rows.items()]
    return "\n".join(lines)


def model_file(store: Path, model: str) -> Path:
    """The ONNX file of the model's highest version in the store."""
    versions = sorted((int(p.name), p) for p in (store / model).iterdir() if p.name.isdigit())
    return versions[-1][1] / "model.onnx"


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "grpcio": grpc.__version__,
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--suite", choices=("levels", "targets"), default="levels",
        help="levels: the levels given below (default); targets: the issue's performance "
        "targets in one run (see --suite targets --help)",
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
    parser.add_argument("--workers", type=int, default=1,
                        help="gateway worker processes (and no-op server processes)")
    parser.add_argument("--channels", type=int, default=4, help="client connections")
    parser.add_argument("--ceiling-rows", default="1,64", help="batch sizes for the ceiling")
    parser.add_argument("--json", type=Path, help="write every figure here as JSON")
    parser.add_argument(
        "--noop", action=argparse.BooleanOptionalAction, default=True,
        help="also measure a no-op gRPC server on the same stack (the front-end ceiling)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from gateway.settings import demo_store

    argv = list(sys.argv[1:] if argv is None else argv)
    # --suite targets has flags of its own: everything but --suite goes to loadtests.suite.
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--suite", choices=("levels", "targets"), default="levels")
    chosen, rest = first.parse_known_args(argv)
    if chosen.suite == "targets":
        from loadtests.suite import main as run_suite

        return run_suite(rest)
    parser = _parser()
    args = parser.parse_args(argv)
    store = args.store or demo_store()
    models = [m for m in args.models.split(",") if m]
    if args.duration <= 0 or args.duration > 600:
        parser.error("--duration must lie in (0, 600]")
    if args.workers < 1 or args.channels < 1:
        parser.error("--workers and --channels must be at least 1")
    rates = [float(r) for r in args.rates.split(",") if r]
    levels = len(models) * (len(ints(args.concurrency)) + len(rates))
    levels += len(ints(args.concurrency)) if args.noop else 0
    progress = Progress(levels * (args.warmup + args.duration))
    with contextlib.ExitStack() as stack:
        target = (
            require_loopback(args.target)
            if args.target
            else stack.enter_context(start_gateway(store, workers=args.workers)).target
        )
        results = asyncio.run(
            run_levels(
                target,
                models,
                ints(args.concurrency),
                rates,
                duration_s=args.duration,
                warmup_s=args.warmup,
                rows=args.rows,
                channels=args.channels,
                workers=args.workers,
                progress=progress,
            )
        )
        if args.noop:
            request, answer = asyncio.run(one_answer(target, models[0], args.rows))
    if args.noop:
        # After the gateway stopped: the no-op server gets the machine the gateway had.
        with noop_process(free_port(), answer, workers=args.workers) as noop:
            results += asyncio.run(
                run_noop_levels(noop, request, ints(args.concurrency),
                                duration_s=args.duration, warmup_s=args.warmup, rows=args.rows,
                                channels=args.channels, workers=args.workers,
                                progress=progress)
            )
    # Measured with the gateway stopped, so the ceiling has the machine to itself.
    ceilings: dict[str, dict[int, float]] = {}
    files: dict[Path, str] = {}
    for model in models:
        path = model_file(store, model).resolve()
        if path.read_bytes() in {p.read_bytes() for p in files}:
            continue
        files[path] = model
        ceilings[model] = {
            n: ort_ceiling(path, n, min(args.duration, 5.0)) for n in ints(args.ceiling_rows)
        }
    print()
    print(format_table(results, ceilings))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine(),
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
