"""The targets suite: every figure of the issue's performance targets from one bounded run
against ``modelgate serve`` on loopback, written as Markdown, JSON and a PNG (loadtests.report).

    .venv/bin/python -m loadtests.benchmark --suite targets --out docs/benchmark"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import grpc

from loadtests import h2load
from loadtests.ceilings import ort_ceilings, ort_latencies
from loadtests.drivers import Metadata, stubs_on
from loadtests.measurements import BASELINE, NOOP, NOOP_CNN, CostRun, Measurements, latency_summary
from loadtests.noop_server import NoopServer, start_noop
from loadtests.progress import Progress
from loadtests.requests import request_for
from loadtests.results import LevelResult, format_row
from loadtests.runner import machine, measure_level, model_file
from loadtests.servers import (
    Counters,
    Served,
    cpu_seconds,
    free_port,
    redis_process,
    scrape,
    start_gateway,
)
from loadtests.suite_config import START_S, Config, config_from, parser
from loadtests.targets import COMPUTE, FRONT_END, UNBATCHED, evaluate, format_targets
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc

MONITORING = "monitoring on (default sampling)"


class Suite:
    def __init__(self, config: Config, progress: Progress | None = None) -> None:
        self.c = config
        self.progress = progress
        self.m = Measurements(config={k: str(v) for k, v in asdict(config).items()},
                              machine=machine())
        self._idle_share = 0.0  # the most CPU the idle server used while the other ran
        self._load_at_start = os.getloadavg()[0]

    def run(self) -> Measurements:
        began = time.monotonic()
        self.m.started_at = datetime.now().astimezone().isoformat(timespec="seconds")
        for workers in self.c.workers:
            self._serving(workers)
        self._ceilings()  # the servers are stopped: ONNX Runtime gets the machine alone
        if self.c.costs:
            self._costs()
        self.m.machine["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
        self.m.wall_s = time.monotonic() - began
        # The load at the start is other work's (the end's would count this run's own).
        cpus, before = os.cpu_count() or 1, self._load_at_start
        if before > 0.5 * cpus:
            self.m.notes.append(
                f"The machine was not idle: a 1-minute load average of {before:.1f} on "
                f"{cpus} CPUs before the run started; other work shared the cores, so "
                "compare figures within this run only, and rerun on an idle machine for "
                "figures to quote.")
        return self.m

    # ---- one level, either driver ------------------------------------------------------

    def _step(self, label: str, seconds: float) -> contextlib.AbstractContextManager[None]:
        return Progress.step_of(self.progress, label, seconds)

    async def _python(
        self, stubs: Sequence[pb_grpc.GRPCInferenceServiceStub], server_pid: int,
        metrics_port: int | None, request: pb.ModelInferRequest, *, model: str, mode: str,
        load: float, workers: int, label: str = "", metadata: Metadata | None = None,
    ) -> LevelResult:
        before = scrape(metrics_port) if metrics_port else None
        cpu, client, began = cpu_seconds(server_pid), time.process_time(), time.perf_counter()
        with self._step(f"{model} {mode} {load:g} (python, {workers}w)",
                        self.c.warmup_s + self.c.duration_s):
            result = await measure_level(stubs, request, model, mode, load,
                                         duration_s=self.c.duration_s, warmup_s=self.c.warmup_s,
                                         statistics=False, metadata=metadata)
        result.wall_s = time.perf_counter() - began
        result.server_cpu_s = cpu_seconds(server_pid) - cpu
        result.client_cpu_s = time.process_time() - client
        result.workers, result.label = workers, label
        self._count(result, metrics_port, before)
        print(format_row(result), flush=True)
        return result

    def _h2load(
        self, server: Served | NoopServer, request: pb.ModelInferRequest, *, model: str,
        workers: int, label: str = "", headers: Sequence[str] = (),
        concurrency: int | None = None,
    ) -> LevelResult:
        concurrency = concurrency or self.c.target_concurrency
        connections = min(concurrency, self.c.channels * workers)
        streams = max(1, concurrency // connections)
        metrics_port = server.metrics_port if isinstance(server, Served) else None
        before = scrape(metrics_port) if metrics_port else None
        cpu, began = cpu_seconds(server.pid), time.perf_counter()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        with self._step(f"{model} closed {connections * streams} (h2load, {workers}w)",
                        self.c.warmup_s + self.c.duration_s):
            run = h2load.run_h2load(server.target, h2load.body_for(request),
                                    connections=connections, streams=streams,
                                    duration_s=self.c.duration_s, warmup_s=self.c.warmup_s,
                                    headers=headers)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = h2load.as_level(run, model, rows=int(request.inputs[0].shape[0]),
                                 workers=workers, label=label, connections=connections,
                                 streams=streams)
        result.wall_s = time.perf_counter() - began
        result.server_cpu_s = cpu_seconds(server.pid) - cpu
        result.client_cpu_s = (after.ru_utime + after.ru_stime
                               - children.ru_utime - children.ru_stime)
        # h2load cannot see gRPC status codes; the gateway's own counters can.
        self._count(result, metrics_port, before, in_flight=connections * streams)
        print(format_row(result), flush=True)
        return result

    @staticmethod
    def _count(result: LevelResult, metrics_port: int | None, before: Counters | None,
               in_flight: int | None = None) -> None:
        """Rows and batches the gateway ran over the level; with ``in_flight`` (an h2load
        level) also its answers by status code, which h2load cannot read."""
        after = scrape(metrics_port) if metrics_port else None
        if after is None or before is None:
            return
        delta = after.since(before)
        result.inferences = delta.rows[result.model]
        result.executions = delta.batches[result.model]
        if in_flight is None:
            return
        errors = delta.errors(result.model)
        # h2load resets the streams still open when its time is up; the gateway counts
        # those CANCELLED. Up to one per stream is that, not a failure.
        if errors.get("CANCELLED", 0) <= in_flight:
            errors.pop("CANCELLED", None)
        for code, count in errors.items():
            result.errors[f"grpc {code}"] = result.errors.get(f"grpc {code}", 0) + count

    # ---- phases ---------------------------------------------------------------------

    async def _check(
        self, target: str, models: Sequence[str], key: Metadata | None = None
    ) -> tuple[dict[str, pb.ModelInferRequest], bytes]:
        """One real call per model through our stub before any load: h2load cannot tell
        an error answer from a good one, so correctness is checked here. Returns the
        requests and the first model's serialized answer (what the no-op server sends)."""
        requests: dict[str, pb.ModelInferRequest] = {}
        answer = b""
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for model in models:
                rows = self.c.cnn_rows if model == COMPUTE else 1
                metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name=model),
                                                    metadata=key, timeout=30)
                request = request_for(metadata, batch=rows)
                response = await stub.ModelInfer(request, metadata=key, timeout=30)
                if len(response.outputs) != len(metadata.outputs) or any(
                    o.shape[0] != rows for o in response.outputs
                ):
                    raise RuntimeError(f"{model}: unexpected answer {response.outputs}")
                if h2load.parse_frame(h2load.body_for(request)) != request.SerializeToString():
                    raise RuntimeError(f"{model}: the h2load body does not hold the request")
                requests[model] = request
                answer = answer or response.SerializeToString()
        return requests, answer

    def _serving(self, workers: int) -> None:
        with self._step(f"starting the gateway ({workers}w)", START_S):
            gateway = contextlib.ExitStack()
            gw = gateway.enter_context(start_gateway(self.c.store, workers=workers))
        with gateway:
            requests, answer = asyncio.run(self._check(gw.target, (FRONT_END, UNBATCHED,
                                                                   COMPUTE)))
            with start_noop(free_port(), answer, workers) as noop:
                asyncio.run(self._python_levels(gw, noop, requests, workers))
                if self.c.h2load:
                    for server, model in ((gw, FRONT_END), (noop, NOOP), (gw, UNBATCHED)):
                        if model == UNBATCHED and workers > 1:
                            continue
                        request = requests[FRONT_END if model == NOOP else model]
                        self.m.levels.append(self._h2load(server, request, model=model,
                                                          workers=workers))
                    if workers == 1:
                        # The compute-bound model with a client that leaves the cores to
                        # the server and ONNX Runtime (ours needs ~1 ms of CPU a request).
                        for load in self.c.cnn_concurrency:
                            self.m.levels.append(self._h2load(
                                gw, requests[COMPUTE], model=COMPUTE, workers=1,
                                concurrency=load))
                        # Concurrency 1 with the leanest client: what the server adds per
                        # call, rather than what our Python client costs.
                        for server, model in ((noop, NOOP), (gw, UNBATCHED), (gw, FRONT_END)):
                            request = requests[FRONT_END if model == NOOP else model]
                            self.m.levels.append(self._h2load(
                                server, request, model=model, workers=1, concurrency=1))
        if len(self.m.checks) == 0:
            self.m.checks.append(
            f"Before the levels, one real ModelInfer per model ({FRONT_END}, {UNBATCHED}, "
            f"{COMPUTE} with {self.c.cnn_rows} rows) through our Python stub answered OK with "
            "every output and the request's batch size; h2load posts those same request "
            "bytes (a gRPC frame checked to parse back into the request). h2load does not "
            "read gRPC status trailers: its errors column against the gateway comes from "
            "the gateway's own counters by status code (warm-up included), leaving out the "
            "CANCELLED streams h2load resets when its time is up (at most one per stream)."
        )

    async def _python_levels(self, gw: Served, noop: NoopServer,
                             requests: dict[str, pb.ModelInferRequest], workers: int) -> None:
        channels = self.c.channels * workers
        full = workers == 1
        concurrency = self.c.concurrency if full else (self.c.target_concurrency,)
        async with stubs_on(gw.target, channels) as g, stubs_on(noop.target, channels) as n:
            for load in concurrency:
                # Gateway and no-op levels alternate, so both see the same machine; the
                # idle one's CPU is in the notes.
                order = [(g, gw.pid, gw.metrics_port, FRONT_END), (n, noop.pid, None, NOOP)]
                if full:
                    order.append((g, gw.pid, gw.metrics_port, UNBATCHED))
                for stubs, pid, port, model in order:
                    idle = noop.pid if model != NOOP else gw.pid
                    idle_cpu, began = cpu_seconds(idle), time.perf_counter()
                    request = requests[FRONT_END if model == NOOP else model]
                    self.m.levels.append(await self._python(
                        stubs, pid, port, request, model=model, mode="closed", load=load,
                        workers=workers))
                    share = (cpu_seconds(idle) - idle_cpu) / (time.perf_counter() - began)
                    self._idle_share = max(self._idle_share, share)
            if not full:
                return
            for model in (FRONT_END, UNBATCHED):
                peak = max(r.throughput for r in self.m.levels
                           if r.model == model and r.mode == "closed" and r.workers == 1)
                for fraction in self.c.open_fractions:
                    rate = max(1.0, round(fraction * peak))
                    self.m.levels.append(await self._python(
                        g, gw.pid, gw.metrics_port, requests[model], model=model, mode="open",
                        load=rate, workers=workers,
                        label=f"{100 * fraction:.0f} % of its closed-loop peak"))
            for load in self.c.cnn_concurrency:
                self.m.levels.append(await self._python(
                    g, gw.pid, gw.metrics_port, requests[COMPUTE], model=COMPUTE,
                    mode="closed", load=load, workers=workers))
            # The transport's share of the big requests: the no-op server, cnn's request.
            self.m.levels.append(await self._python(
                n, noop.pid, None, requests[COMPUTE], model=NOOP_CNN, mode="closed",
                load=max(self.c.cnn_concurrency), workers=workers))
        self.m.notes.append(
            "Gateway and no-op server run side by side and their levels alternate; the idle "
            f"one used at most {100 * self._idle_share:.1f} % of a core "
            "while the other was measured."
        )

    def _ceilings(self) -> None:
        for model in (FRONT_END, COMPUTE):
            path = model_file(self.c.store, model)
            with self._step(f"ONNX Runtime {model}", self.c.ceiling_s * len(self.c.ceiling_rows)):
                self.m.ort_rows_per_s[model] = ort_ceilings(path, self.c.ceiling_rows,
                                                            self.c.ceiling_s)
        with self._step("ONNX Runtime single-call latency", self.c.ceiling_s):
            latencies = ort_latencies(model_file(self.c.store, UNBATCHED), 1, self.c.ceiling_s)
        self.m.ort_latency_us[FRONT_END] = latency_summary(latencies)
        self.m.notes.append(
            "ONNX Runtime ceilings run in the benchmark process after the servers stopped, "
            "with the gateway's session options (CPU unless CUDA works, its intra-op and "
            f"inter-op thread settings), for {self.c.ceiling_s:g} s per batch size; the "
            "single-call latency is session.run on 1 row, call after call."
        )

    def _costs(self) -> None:
        from loadtests.quota_bench import HIGH, tenants_file
        from loadtests.tracing_bench import span_sink

        with contextlib.ExitStack() as stack:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            tenants, key = tenants_file(folder, [*HIGH, "--concurrent", "100000"])
            endpoint, sink = stack.enter_context(span_sink())
            # Monitoring is on by default: every run but its own variant turns it off, so
            # each variant differs from the baseline in one feature.
            off = ["--no-monitoring"]
            variants: list[tuple[str, list[str], str | None]] = [
                (BASELINE, off, None),
                ("in-process quotas", [*off, "--tenants", str(tenants)], key),
            ]
            try:
                url = stack.enter_context(redis_process())
                variants.append(("Redis quotas", [*off, "--tenants", str(tenants),
                                                  "--redis-url", url], key))
            except RuntimeError as exc:
                self.m.notes.append(f"Redis quotas not measured: {exc}.")
            variants.append(("tracing 1 %", [*off, "--otlp-endpoint", endpoint,
                                             "--trace-sampling-ratio", "0.01"], None))
            variants.append((MONITORING, [], None))
            # The baseline between every two variants: each variant run is compared with
            # the baseline runs just before and after it, so the machine's drift (other
            # work coming and going on a shared VM) shows in both or neither.
            sequence = [variants[0]]
            for _ in range(self.c.cost_rounds):
                for each in variants[1:]:
                    sequence += [each, variants[0]]
            self.m.cost_method = (
                "Each run is a fresh `modelgate serve` (1 worker) measuring "
                f"{FRONT_END} at {self.c.target_concurrency} concurrent requests with the "
                f"Python client{' then h2load' if self.c.h2load else ''}. Order: "
                f"{', '.join(v[0] for v in sequence)}: every variant run sits between two "
                "baseline runs and is compared with their mean (A/B/A), so drift of the "
                "machine's speed over the run cancels out; a variant's figure is the mean "
                "of those ratios over its runs. Quotas: one tenant, its key on every call, "
                "with requests_per_s, "
                "burst, rows_per_s, requests_per_day and concurrent limits far above the "
                "load (every request charged, none rejected; with Redis, tokens and "
                "concurrent slots are leased in blocks). Tracing: 1 % sampling, "
                "exported over OTLP/gRPC to an in-process sink on loopback. Monitoring: drift "
                "sampling at its defaults (1 request in 10, at most 1000 rows/s) against the "
                "demo store's digits profile; every other run has --no-monitoring."
            )
            for position, (variant, flags, api_key) in enumerate(sequence, 1):
                spans = sink.spans
                self._cost_run(position, variant, flags, api_key)
                if variant.startswith("tracing"):
                    self.m.notes.append(f"Cost run {position} ({variant}): the sink received "
                                        f"{sink.spans - spans} spans.")

    def _cost_run(self, position: int, variant: str, flags: list[str],
                  key: str | None) -> None:
        metadata: Metadata | None = (("authorization", f"Bearer {key}"),) if key else None
        with self._step(f"starting the gateway ({variant})", START_S):
            stack = contextlib.ExitStack()
            gw = stack.enter_context(start_gateway(self.c.store, flags))
        with stack:
            request = asyncio.run(self._check(gw.target, (FRONT_END,), metadata))[0][FRONT_END]

            async def python() -> LevelResult:
                async with stubs_on(gw.target, self.c.channels) as stubs:
                    return await self._python(
                        stubs, gw.pid, gw.metrics_port, request, model=FRONT_END,
                        mode="closed", load=self.c.target_concurrency, workers=1,
                        label=variant, metadata=metadata)

            self.m.costs.append(CostRun(variant, position, asyncio.run(python())))
            if self.c.h2load:
                headers = [f"authorization: Bearer {key}"] if key else []
                self.m.costs.append(CostRun(variant, position, self._h2load(
                    gw, request, model=FRONT_END, workers=1, label=variant, headers=headers)))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cli = parser()
    args = cli.parse_args(argv)
    config = config_from(args, cli)
    progress = Progress(config.planned_s())
    print(f"targets suite: about {config.planned_s() / 60:.1f} min planned", file=sys.stderr)
    measurements = Suite(config, progress).run()
    if not config.h2load:
        measurements.notes.append("h2load not installed or not asked for: Python client only.")
    targets = evaluate(measurements, config.target_concurrency)
    command = shlex.join([".venv/bin/python", "-m", "loadtests.benchmark", "--suite",
                          "targets", *argv])
    from loadtests.report import write

    paths = write(measurements, targets, args.out, command)
    print()
    print(format_targets(targets))
    print(f"\nwritten: {', '.join(str(p) for p in paths)} ({measurements.wall_s / 60:.1f} min)")
    return 0
