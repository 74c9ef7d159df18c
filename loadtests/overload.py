"""Overload benchmark: measures a model's capacity (closed loop), then offers a multiple of
it open loop and reports goodput, answer codes, shedding latency, health probes and the
gateway's memory. On demand; tests/hardening/test_overload.py runs a short version."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper, numpy_helper

from loadtests.benchmark import served_gateway
from loadtests.requests import request_for, require_loopback
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc

# Open-loop requests outstanding in the client at most: beyond this the client, not the
# gateway, would be what runs out of memory.
MAX_OUTSTANDING = 20_000
SLOW_WIDTH = 512


def slow_model(layers: int = 256) -> bytes:
    """A compute-bound model (``layers`` 512x512 MatMuls, about 7 ms a row on one core of
    the development machine): capacity is set by the model, not by gRPC or Python."""
    weight = numpy_helper.from_array(np.eye(SLOW_WIDTH, dtype=np.float32), "w")
    nodes = []
    previous = "x"
    for index in range(layers):
        output = "y" if index == layers - 1 else f"h{index}"
        nodes.append(helper.make_node("MatMul", [previous, "w"], [output]))
        previous = output
    graph = helper.make_graph(
        nodes, "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SLOW_WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", SLOW_WIDTH])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return bytes(model.SerializeToString())


def slow_store(root: Path, layers: int = 256) -> Path:
    """A model store holding the model ``slow`` (no dynamic batching, one instance)."""
    folder = root / "slow" / "1"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(slow_model(layers))
    (root / "slow" / "config.pbtxt").write_text(
        'name: "slow"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
        f'input {{ name: "x" data_type: TYPE_FP32 dims: [ {SLOW_WIDTH} ] }}\n'
        f'output {{ name: "y" data_type: TYPE_FP32 dims: [ {SLOW_WIDTH} ] }}\n',
        encoding="utf-8",
    )
    return root


@dataclass
class Phase:
    """What one load phase saw. Latencies in milliseconds."""

    name: str
    duration_s: float
    offered_rps: float | None = None
    codes: dict[str, int] = field(default_factory=dict)
    ok_ms: list[float] = field(default_factory=list)
    shed_ms: list[float] = field(default_factory=list)
    health_checks: int = 0
    health_failures: int = 0
    rss_kib: list[int] = field(default_factory=list)
    dropped_by_client: int = 0

    @property
    def goodput(self) -> float:
        return self.codes.get("OK", 0) / self.duration_s

    def summary(self) -> dict[str, object]:
        data = asdict(self)
        data.pop("ok_ms")
        data.pop("shed_ms")
        data.pop("rss_kib")
        data["goodput_rps"] = round(self.goodput, 1)
        data["ok_p50_ms"], data["ok_p99_ms"] = percentiles(self.ok_ms)
        data["shed_p50_ms"], data["shed_p99_ms"] = percentiles(self.shed_ms)
        data["rss_max_mib"] = round(max(self.rss_kib, default=0) / 1024, 1)
        return data


def percentiles(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    ordered = sorted(values)
    return (round(ordered[len(ordered) // 2], 2),
            round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2))


def rss_kib(pid: int) -> int:
    """Resident memory of a process (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _one(stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest,
               timeout_s: float, phase: Phase) -> None:
    start = time.perf_counter()
    try:
        await stub.ModelInfer(request, timeout=timeout_s)
        code = "OK"
    except grpc.RpcError as exc:
        code = exc.code().name
    elapsed = (time.perf_counter() - start) * 1000
    phase.codes[code] = phase.codes.get(code, 0) + 1
    if code == "OK":
        phase.ok_ms.append(elapsed)
    elif code == "RESOURCE_EXHAUSTED":
        phase.shed_ms.append(elapsed)


async def _watch(target: str, pid: int | None, phase: Phase, stop: asyncio.Event) -> None:
    """Probe grpc.health every 100 ms (each must answer SERVING within 1 s) and sample the
    gateway's memory."""
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while not stop.is_set():
            phase.health_checks += 1
            try:
                answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if answer.status != health_pb2.HealthCheckResponse.SERVING:
                    phase.health_failures += 1
            except grpc.RpcError:
                phase.health_failures += 1
            if pid is not None:
                phase.rss_kib.append(rss_kib(pid))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)


async def closed_loop(target: str, request: pb.ModelInferRequest, *, concurrency: int,
                      duration_s: float, timeout_s: float, pid: int | None = None) -> Phase:
    """``concurrency`` callers, each sending its next request when the last is answered."""
    phase = Phase(f"closed loop x{concurrency}", duration_s)
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        end = time.perf_counter() + duration_s

        async def caller() -> None:
            while time.perf_counter() < end:
                await _one(stub, request, timeout_s, phase)

        watcher = asyncio.create_task(_watch(target, pid, phase, stop))
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        stop.set()
        await watcher
    return phase


async def open_loop(target: str, request: pb.ModelInferRequest, *, rate: float,
                    duration_s: float, timeout_s: float, pid: int | None = None) -> Phase:
    """Requests sent at ``rate`` per second whatever the answers do (arrivals do not wait
    for the server: what overload looks like to a gateway)."""
    phase = Phase(f"open loop {rate:.0f}/s", duration_s, offered_rps=rate)
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        watcher = asyncio.create_task(_watch(target, pid, phase, stop))
        tasks: set[asyncio.Task[None]] = set()
        start = time.perf_counter()
        sent = 0
        while (now := time.perf_counter()) < start + duration_s:
            due = int((now - start) * rate) + 1
            for _ in range(due - sent):
                if len(tasks) >= MAX_OUTSTANDING:
                    phase.dropped_by_client += 1
                    continue
                task = asyncio.create_task(_one(stub, request, timeout_s, phase))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            sent = due
            await asyncio.sleep(0.002)
        await asyncio.gather(*tasks)
        stop.set()
        await watcher
    return phase


async def overload(target: str, model: str, *, pid: int | None, capacity_s: float,
                   overload_s: float, factor: float, concurrency: int, timeout_s: float,
                   batch: int = 1) -> tuple[Phase, Phase]:
    """(capacity phase, overload phase at ``factor`` times the measured goodput)."""
    async with grpc.aio.insecure_channel(target) as channel:
        metadata = await pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
            pb.ModelMetadataRequest(name=model), timeout=10
        )
    request = request_for(metadata, batch=batch)
    await closed_loop(target, request, concurrency=concurrency, duration_s=min(1.0, capacity_s),
                      timeout_s=timeout_s)  # warm-up
    capacity = await closed_loop(target, request, concurrency=concurrency,
                                 duration_s=capacity_s, timeout_s=timeout_s, pid=pid)
    rate = max(1.0, capacity.goodput * factor)
    loaded = await open_loop(target, request, rate=rate, duration_s=overload_s,
                             timeout_s=timeout_s, pid=pid)
    return capacity, loaded


def format_table(phases: Sequence[Phase]) -> str:
    lines = ["| phase | offered req/s | goodput req/s | codes | OK p50/p99 ms | shed p50/p99 ms "
             "| health fails | max RSS MiB |", "|---|---:|---:|---|---:|---:|---:|---:|"]
    for phase in phases:
        s = phase.summary()
        codes = ", ".join(f"{k} {v}" for k, v in sorted(phase.codes.items()))
        offered = f"{phase.offered_rps:.0f}" if phase.offered_rps else "closed"
        lines.append(
            f"| {phase.name} | {offered} | {phase.goodput:.0f} | {codes} | "
            f"{s['ok_p50_ms']}/{s['ok_p99_ms']} | {s['shed_p50_ms']}/{s['shed_p99_ms']} | "
            f"{phase.health_failures}/{phase.health_checks} | {s['rss_max_mib']} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.overload", description=__doc__)
    parser.add_argument("--target", help="a running gateway (loopback only); default: start one")
    parser.add_argument("--pid", type=int, help="its process id, to sample memory")
    parser.add_argument("--store", type=Path,
                        help="model store (default: a temporary one with the model 'slow')")
    parser.add_argument("--model", default="slow")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--max-inflight", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--capacity-s", type=float, default=10.0)
    parser.add_argument("--overload-s", type=float, default=30.0)
    parser.add_argument("--factor", type=float, default=2.0)
    parser.add_argument("--timeout-s", type=float, default=5.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    run = dict(model=args.model, capacity_s=args.capacity_s, overload_s=args.overload_s,
               factor=args.factor, concurrency=args.concurrency, timeout_s=args.timeout_s,
               batch=args.batch)
    if args.target:
        phases = asyncio.run(overload(require_loopback(args.target), pid=args.pid, **run))
    else:
        with tempfile.TemporaryDirectory() as folder, served_gateway(
            args.store or slow_store(Path(folder)),
            ["--max-inflight-requests", str(args.max_inflight)],
        ) as (target, pid):
            phases = asyncio.run(overload(target, pid=pid, **run))
    print(format_table(phases))
    capacity, loaded = phases
    print(f"goodput under {args.factor:g}x load: {loaded.goodput:.0f} req/s = "
          f"{100 * loaded.goodput / max(capacity.goodput, 1e-9):.0f}% of the "
          f"{capacity.goodput:.0f} req/s measured at capacity")
    if args.json:
        args.json.write_text(json.dumps([p.summary() for p in phases], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

