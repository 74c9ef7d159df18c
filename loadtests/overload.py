"""Overload benchmark: a model's capacity (closed loop), then twice it offered at a fixed rate,
then a flood of many times it from several connections. Reports goodput, answer codes,
latency, health probes (sent from a separate process, each with a 1 s deadline) and the
gateway's memory, with our Python client and with h2load. On demand;
tests/hardening/test_overload.py runs a short version.

    .venv/bin/python -m loadtests.overload                  # both drivers, about 2.5 minutes
    .venv/bin/python -m loadtests.overload --drivers h2load --json overload.json

h2load cannot read gRPC status trailers, so its answers by code come from the gateway's own
``modelgate_inference_requests_total`` (its metrics port)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import shlex
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from onnx import TensorProto, helper, numpy_helper

from loadtests import h2load
from loadtests.probes import Prober, ProbeResults, Watch, watching
from loadtests.requests import request_for, require_loopback
from loadtests.runner import machine
from loadtests.servers import cpu_seconds, scrape, start_gateway
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc

# Open-loop requests outstanding in the client at most: beyond this the client, not the
# gateway, would be what runs out of memory.
MAX_OUTSTANDING = 20_000
SLOW_WIDTH = 512
DRIVERS = ("python", "h2load")


def slow_model(layers: int = 256) -> bytes:
    """A compute-bound model (``layers`` 512x512 MatMuls, about 9 ms a row on one core of
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


@dataclass(frozen=True)
class Gateway:
    """The gateway under load: gRPC target, process id (memory) and metrics port (the
    answers by code of h2load phases); either may be unknown for a gateway given by hand."""

    target: str
    pid: int | None = None
    metrics_port: int | None = None


@dataclass
class Phase:
    """What one load phase saw. Latencies in milliseconds: for our client, of OK and of
    RESOURCE_EXHAUSTED answers apart; h2load cannot tell them apart, so ``ok_ms`` then
    holds every answer's."""

    name: str
    driver: str
    duration_s: float
    offered_rps: float | None = None  # None: closed loop
    codes: dict[str, int] = field(default_factory=dict)
    ok_ms: list[float] = field(default_factory=list)
    shed_ms: list[float] = field(default_factory=list)
    watch: Watch = field(default_factory=Watch)
    dropped_by_client: int = 0
    client_errors: dict[str, int] = field(default_factory=dict)  # h2load's own failures
    command: str = ""  # the h2load command line
    server_cpu_s: float | None = None  # CPU time the gateway used during the phase
    client_cpu_s: float | None = None  # and the load generator

    @property
    def goodput(self) -> float:
        return self.codes.get("OK", 0) / self.duration_s

    @property
    def probes(self) -> ProbeResults:
        return self.watch.probes

    def summary(self) -> dict[str, object]:
        data = asdict(self)
        for bulky in ("ok_ms", "shed_ms", "watch"):
            data.pop(bulky)
        probes = self.probes
        data["goodput_rps"] = round(self.goodput, 1)
        data["ok_p50_ms"], data["ok_p99_ms"] = percentiles(self.ok_ms)
        data["shed_p50_ms"], data["shed_p99_ms"] = percentiles(self.shed_ms)
        data["probes_sent"], data["probe_failures"] = probes.sent, probes.failures
        data["probe_p50_ms"], _ = percentiles(probes.latencies_ms)
        data["probe_max_ms"] = max(probes.latencies_ms, default=None)
        data["rss_max_mib"] = round(max(self.watch.rss_kib, default=0) / 1024, 1)
        data["peak_rss_growth_mib"] = round(self.watch.peak_growth_kib / 1024, 1)
        for key in ("server_cpu_s", "client_cpu_s"):
            value = data.pop(key)
            data[key.replace("_cpu_s", "_cores")] = (
                None if value is None else round(value / self.duration_s, 2))
        return data


@dataclass
class CpuUse:
    """CPU seconds over a phase: the gateway's (with its worker processes) and the load
    generator's."""

    server_s: float | None = None
    client_s: float | None = None


@contextlib.contextmanager
def cpu_use(pid: int | None, child: bool) -> Iterator[CpuUse]:
    """The gateway's CPU time and this process's, or with ``child`` that of the
    subprocesses that ended meanwhile (h2load)."""
    use = CpuUse()
    server, client = cpu_seconds(pid) if pid else None, time.process_time()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    yield use
    if server is not None and pid:
        use.server_s = cpu_seconds(pid) - server
    if child:
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        use.client_s = (after.ru_utime + after.ru_stime
                        - children.ru_utime - children.ru_stime)
    else:
        use.client_s = time.process_time() - client


def percentiles(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    ordered = sorted(values)
    return (round(ordered[len(ordered) // 2], 2),
            round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2))


# ---- our Python client ----------------------------------------------------------------

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


async def closed_loop(target: str, request: pb.ModelInferRequest, *, concurrency: int,
                      duration_s: float, timeout_s: float) -> Phase:
    """``concurrency`` callers on one channel, each sending its next request when the
    last is answered."""
    phase = Phase(f"capacity, closed loop x{concurrency}", "python", duration_s)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        end = time.perf_counter() + duration_s

        async def caller() -> None:
            while time.perf_counter() < end:
                await _one(stub, request, timeout_s, phase)

        await asyncio.gather(*(caller() for _ in range(concurrency)))
    return phase


async def open_loop(target: str, request: pb.ModelInferRequest, *, rate: float,
                    duration_s: float, timeout_s: float, name: str = "") -> Phase:
    """Requests sent at ``rate`` per second whatever the answers do (arrivals do not wait
    for the server: what overload looks like to a gateway)."""
    phase = Phase(name or f"open loop {rate:.0f}/s", "python", duration_s, offered_rps=rate)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
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
    return phase


# ---- h2load ---------------------------------------------------------------------------

def h2load_phase(gateway: Gateway, request: pb.ModelInferRequest, name: str, *,
                 connections: int, streams: int, duration_s: float,
                 rate: float | None = None, prober: Prober | None = None) -> Phase:
    """One h2load run (closed loop, or at ``rate`` per second), answers by code from the
    gateway's counters: every inference answer it gave meanwhile, ours only on loopback."""
    if gateway.metrics_port is None:
        raise ValueError("h2load phases need the gateway's metrics port")
    phase = Phase(name, "h2load", duration_s, offered_rps=rate)
    before = scrape(gateway.metrics_port)
    with watching(prober, gateway.pid) as phase.watch, cpu_use(gateway.pid, True) as cpu:
        run = h2load.run_h2load(gateway.target, h2load.body_for(request),
                                connections=connections, streams=streams,
                                duration_s=duration_s, warmup_s=0.0, rate_per_s=rate)
    phase.server_cpu_s, phase.client_cpu_s = cpu.server_s, cpu.client_s
    after = scrape(gateway.metrics_port)
    if before is None or after is None:
        raise RuntimeError("the gateway's /metrics did not answer")
    codes: Counter[str] = Counter()
    for (_, code), count in after.since(before).answers.items():
        codes[code] += count
    phase.codes = {code: n for code, n in codes.items() if n}
    phase.ok_ms = [s * 1000 for s in run.latencies_s]
    phase.client_errors = dict(run.http_errors)
    for label, count in (("h2load errored", run.errored), ("h2load timeout", run.timed_out)):
        if count:
            phase.client_errors[label] = count
    command = list(run.command)
    del command[command.index("--log-file"):command.index("--log-file") + 2]
    phase.command = shlex.join("body.bin" if part.endswith("body.bin") else part
                               for part in command)
    return phase


def _python_phase(gateway: Gateway, prober: Prober, phase: Coroutine[Any, Any, Phase]) -> Phase:
    """Runs one phase of our client, watched."""
    with watching(prober, gateway.pid) as watch, cpu_use(gateway.pid, False) as cpu:
        result = asyncio.run(phase)
    result.watch, result.server_cpu_s, result.client_cpu_s = watch, cpu.server_s, cpu.client_s
    return result


# ---- the run --------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """Durations and shapes of the phases."""

    drivers: tuple[str, ...] = DRIVERS
    capacity_s: float = 10.0
    overload_s: float = 30.0
    flood_s: float = 20.0  # 0: no flood phase
    factor: float = 2.0
    concurrency: int = 16
    timeout_s: float = 5.0
    flood_connections: int = 8
    flood_streams: int = 256
    rate_connections: int = 4
    rate_streams: int = 64


def run_overload(gateway: Gateway, model: str, plan: Plan, batch: int = 1) -> list[Phase]:
    """Per driver: capacity (closed loop at ``concurrency``), then ``factor`` times that
    at a fixed rate; last, with h2load, a closed-loop flood of ``flood_connections`` x
    ``flood_streams``. Health probes and memory are watched throughout."""
    with grpc.insecure_channel(gateway.target) as channel:
        metadata = pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
            pb.ModelMetadataRequest(name=model), timeout=10
        )
    request = request_for(metadata, batch=batch)
    phases: list[Phase] = []
    with Prober(gateway.target) as prober:
        asyncio.run(closed_loop(gateway.target, request, concurrency=plan.concurrency,
                                duration_s=min(1.0, plan.capacity_s),
                                timeout_s=plan.timeout_s))  # warm-up
        if "python" in plan.drivers:
            capacity = _python_phase(gateway, prober, closed_loop(
                gateway.target, request, concurrency=plan.concurrency,
                duration_s=plan.capacity_s, timeout_s=plan.timeout_s))
            rate = max(1.0, capacity.goodput * plan.factor)
            loaded = _python_phase(gateway, prober, open_loop(
                gateway.target, request, rate=rate, duration_s=plan.overload_s,
                timeout_s=plan.timeout_s, name=f"{plan.factor:g}x capacity, fixed rate"))
            phases += [capacity, loaded]
        if "h2load" in plan.drivers:
            connections = min(4, plan.concurrency)
            capacity = h2load_phase(
                gateway, request, f"capacity, closed loop x{plan.concurrency}",
                connections=connections, streams=max(1, plan.concurrency // connections),
                duration_s=plan.capacity_s, prober=prober)
            rate = max(1.0, capacity.goodput * plan.factor)
            loaded = h2load_phase(
                gateway, request, f"{plan.factor:g}x capacity, fixed rate",
                connections=plan.rate_connections, streams=plan.rate_streams,
                duration_s=plan.overload_s, rate=rate, prober=prober)
            phases += [capacity, loaded]
            if plan.flood_s > 0:
                phases.append(h2load_phase(
                    gateway, request,
                    f"flood, closed loop {plan.flood_connections}x{plan.flood_streams}",
                    connections=plan.flood_connections, streams=plan.flood_streams,
                    duration_s=plan.flood_s, prober=prober))
    return phases


def capacity_of(phases: Sequence[Phase], driver: str) -> float:
    """The goodput of ``driver``'s closed-loop capacity phase."""
    return next((p.goodput for p in phases if p.driver == driver and p.offered_rps is None
                 and p.name.startswith("capacity")), 0.0)


def format_table(phases: Sequence[Phase]) -> str:
    lines = ["| phase | driver | offered req/s | goodput req/s | of capacity | answers "
             "| OK p50 / p99 ms | shed p50 / p99 ms | probes failed | probe p50 / max ms "
             "| max RSS MiB | peak RSS growth MiB | cores: gateway / client |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for phase in phases:
        s = phase.summary()
        done = sum(phase.codes.values())
        offered = (f"{phase.offered_rps:.0f}" if phase.offered_rps
                   else f"closed ({done / phase.duration_s:.0f})")
        peak = capacity_of(phases, phase.driver)
        share = f"{100 * phase.goodput / peak:.0f} %" if peak else "-"
        codes = ", ".join(f"{k} {v}" for k, v in sorted(phase.codes.items()))
        if phase.client_errors:
            codes += "; client: " + ", ".join(f"{k} {v}" for k, v in phase.client_errors.items())
        ok = f"{s['ok_p50_ms']} / {s['ok_p99_ms']}" + (" (all)" if phase.driver == "h2load"
                                                      else "")
        shed = f"{s['shed_p50_ms']} / {s['shed_p99_ms']}" if phase.shed_ms else "-"
        probes = phase.probes
        lines.append(
            f"| {phase.name} | {phase.driver} | {offered} | {phase.goodput:.0f} | {share} "
            f"| {codes} | {ok} | {shed} | {probes.failed} / {probes.sent} "
            f"| {s['probe_p50_ms']} / {s['probe_max_ms']} | {s['rss_max_mib']} "
            f"| {s['peak_rss_growth_mib']} | {s['server_cores']} / {s['client_cores']} |"
        )
    return "\n".join(lines)


def _drivers(text: str) -> tuple[str, ...]:
    chosen = tuple(d for d in text.split(",") if d)
    unknown = set(chosen) - set(DRIVERS)
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"drivers are python and/or h2load, not {text!r}")
    return chosen


@contextlib.contextmanager
def _gateway(args: argparse.Namespace) -> Iterator[Gateway]:
    if args.target:
        yield Gateway(require_loopback(args.target), args.pid, args.metrics_port)
        return
    with tempfile.TemporaryDirectory() as folder, start_gateway(
        args.store or slow_store(Path(folder)),
        ["--max-inflight-requests", str(args.max_inflight), *args.gateway_args],
    ) as served:
        yield Gateway(served.target, served.pid, served.metrics_port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.overload", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="a running gateway (loopback only); default: start one")
    parser.add_argument("--pid", type=int, help="its process id, to sample memory")
    parser.add_argument("--metrics-port", type=int, help="its metrics port (h2load phases)")
    parser.add_argument("--store", type=Path,
                        help="model store (default: a temporary one with the model 'slow')")
    parser.add_argument("--model", default="slow")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--max-inflight", type=int, default=16)
    parser.add_argument("--gateway-args", type=shlex.split, default=[],
                        help="more flags for the gateway started, e.g. "
                        "'--max-concurrent-streams 0'")
    parser.add_argument("--drivers", type=_drivers, default=DRIVERS,
                        help="python and/or h2load (default: both)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--capacity-s", type=float, default=10.0)
    parser.add_argument("--overload-s", type=float, default=30.0)
    parser.add_argument("--flood-s", type=float, default=20.0, help="0: no flood phase")
    parser.add_argument("--flood-connections", type=int, default=8)
    parser.add_argument("--flood-streams", type=int, default=256)
    parser.add_argument("--factor", type=float, default=2.0)
    parser.add_argument("--timeout-s", type=float, default=5.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if "h2load" in args.drivers and h2load.binary() is None:
        parser.error("h2load is not installed (nghttp2-client): use --drivers python")
    if args.target and "h2load" in args.drivers and args.metrics_port is None:
        parser.error("--target with h2load needs --metrics-port (answers by code)")
    plan = Plan(drivers=args.drivers, capacity_s=args.capacity_s, overload_s=args.overload_s,
                flood_s=args.flood_s, factor=args.factor, concurrency=args.concurrency,
                timeout_s=args.timeout_s, flood_connections=args.flood_connections,
                flood_streams=args.flood_streams)
    with _gateway(args) as gateway:
        phases = run_overload(gateway, args.model, plan, batch=args.batch)
    print(format_table(phases))
    for driver in args.drivers:
        peak = capacity_of(phases, driver)
        for phase in phases:
            if phase.driver == driver and phase.offered_rps:
                print(f"{driver}: goodput at {phase.offered_rps:.0f} req/s offered "
                      f"({args.factor:g}x): {phase.goodput:.0f} req/s = "
                      f"{100 * phase.goodput / max(peak, 1e-9):.0f} % of the {peak:.0f} "
                      "req/s measured at capacity")
    for phase in phases:
        if phase.command:
            print(f"{phase.name}: {phase.command}")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": machine(),
            "settings": {k: str(v) for k, v in vars(args).items()},
            "phases": [p.summary() for p in phases],
        }, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
