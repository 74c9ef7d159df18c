"""The runner's shared pieces: one measured level against a server (closed or open loop,
with the server's batch counts), sets of levels, the no-op levels, and what a run names.

The CLI (loadtests.benchmark), the targets suite and the other benchmarks import these; this
module imports none of them, so the arrows run one way."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import onnxruntime as ort

from loadtests.drivers import Metadata, channels_on, closed_loop, open_loop, stream_loop, stubs_on
from loadtests.progress import Progress
from loadtests.requests import request_for
from loadtests.results import HEADER, LevelResult, format_row
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc

NOOP = "no-op server"


@dataclass(frozen=True)
class LevelPlan:
    """How each level of a run is measured: its seconds (measured, and unmeasured before),
    the rows a request carries, the client's channels, the server's workers (recorded with
    the results; with more than one, ModelStatistics sees one worker only) and the progress
    shown."""

    duration_s: float
    warmup_s: float
    rows: int = 1
    channels: int = 4
    workers: int = 1
    progress: Progress | None = None

    @property
    def level_s(self) -> float:
        """The seconds one level takes, warm-up included."""
        return self.warmup_s + self.duration_s


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
    plan: LevelPlan,
) -> list[LevelResult]:
    """Every model at every closed-loop concurrency, then every open-loop rate."""
    results: list[LevelResult] = []
    async with stubs_on(target, plan.channels) as stubs:
        for model in models:
            metadata = await stubs[0].ModelMetadata(pb.ModelMetadataRequest(name=model))
            request = request_for(metadata, batch=plan.rows)
            levels = [("closed", float(c)) for c in concurrencies]
            levels += [("open", float(r)) for r in rates]
            for mode, load in levels:
                with Progress.step_of(plan.progress, f"{model} {mode} {load:g}", plan.level_s):
                    result = await measure_level(
                        stubs, request, model, mode, load, duration_s=plan.duration_s,
                        warmup_s=plan.warmup_s, statistics=plan.workers == 1,
                    )
                result.workers = plan.workers
                results.append(result)
                print(format_row(result), flush=True)
    return results


async def run_stream_levels(
    target: str,
    models: Sequence[str],
    streams: Sequence[int],
    in_flight: int,
    plan: LevelPlan,
    *,
    label: str | None = None,
    request: pb.ModelInferRequest | None = None,
) -> list[LevelResult]:
    """ModelStreamInfer: every model at every number of streams, each stream keeping
    ``in_flight`` messages unanswered (drivers.stream_loop); latency is per message. With
    ``request`` (and ``label``, its name in the table) that request is sent instead of one
    built from each model's metadata: the no-op server has none."""
    results: list[LevelResult] = []
    async with channels_on(target, plan.channels) as opened:
        for model in models:
            if request is None:
                async with stubs_on(target, 1) as (stub,):
                    metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name=model))
                sent = request_for(metadata, batch=plan.rows)
            else:
                sent = request
            for count in streams:
                name = label or model
                with Progress.step_of(plan.progress, f"{name} {count} streams x {in_flight}",
                                      plan.level_s):
                    window = await stream_loop(opened, sent, count, in_flight,
                                               duration_s=plan.duration_s,
                                               warmup_s=plan.warmup_s)
                result = LevelResult(name, "stream", float(count), plan.rows, window.span,
                                     window.latencies, dict(window.errors),
                                     workers=plan.workers, label=f"{in_flight} in flight")
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
    plan: LevelPlan,
) -> list[LevelResult]:
    """The no-op server (loadtests.noop_server) at every closed-loop concurrency: the same
    client, request and answer size as the gateway runs, with nothing done in between."""
    results: list[LevelResult] = []
    async with stubs_on(target, plan.channels) as stubs:
        for concurrency in concurrencies:
            with Progress.step_of(plan.progress, f"{NOOP} {concurrency}", plan.level_s):
                result = await measure_level(
                    stubs, request, NOOP, "closed", concurrency, duration_s=plan.duration_s,
                    warmup_s=plan.warmup_s, statistics=False,
                )
            result.rows_per_request, result.workers = plan.rows, plan.workers
            results.append(result)
            print(format_row(result), flush=True)
    return results


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


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def _commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=False, timeout=10,
                              cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() or "unknown"


def machine() -> dict[str, object]:
    """What the figures were measured on (and at which commit)."""
    return {
        "cpu_model": _cpu_model(),
        "commit": _commit(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "grpcio": grpc.__version__,
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


