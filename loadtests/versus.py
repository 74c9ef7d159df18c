"""modelgate against Triton 2.51, side by side in one run on one machine: the same ONNX models
(loadtests/peer_models.py), h2load as the client, unary and ModelStreamInfer, the no-op gRPC
servers as the transport ceiling, and the gateway forwarding to that Triton.

    .venv/bin/python -m loadtests.versus --out docs/benchmark/versus

Writes versus.md (the figures and the targets), versus.json and versus.png to --out. Servers
run one at a time, except Triton and the forwarding gateway, which must run together."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from loadtests import h2load
from loadtests.drivers import percentile
from loadtests.noop_server import start_noop
from loadtests.peer_models import peer_models, write_store, write_triton_repository
from loadtests.requests import request_for
from loadtests.runner import machine
from loadtests.servers import children, cpu_seconds, free_port, scrape, start_gateway
from loadtests.versus_report import (
    FORWARD,
    MODELGATE,
    MODELGATE_2,
    NOOP,
    NOOP_2,
    TRITON,
    Figure,
    row,
    write,
)
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class Endpoint:
    """A server under test: its name in the table, where it listens, whose CPU counts."""

    server: str
    target: str
    pid: int | None = None
    metrics_port: int | None = None  # a gateway's: its counters tell gRPC errors


@dataclass(frozen=True)
class Plan:
    duration_s: float = 5.0
    warmup_s: float = 1.0
    connections: int = 4
    streams: int = 8  # per connection
    # gRPC frames per h2load stream body (messages in flight per stream). With 16, Triton
    # 2.51 crashed (SIGSEGV in TRITONSERVER_InferenceRequestDelete) in some runs; with 4,
    # never in ours.
    messages: int = 4


class Bench:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.figures: list[Figure] = []
        self.requests: dict[str, pb.ModelInferRequest] = {}
        self.notes: list[str] = []

    def level(self, at: Endpoint, model: str, kind: str, concurrency: int) -> Figure:
        """One h2load level; CPU from the server's /proc counters, gRPC errors from the
        gateway's own counters (h2load sees HTTP 200 for them)."""
        p, target, cpu_pid, metrics_port = self.plan, at.target, at.pid, at.metrics_port
        request = self.requests[model]
        connections = min(p.connections, concurrency)
        streams = max(1, concurrency // connections)
        if kind == "stream":
            body, path, per = h2load.stream_body_for(request, p.messages), h2load.STREAM_PATH, \
                p.messages
        else:
            body, path, per = h2load.body_for(request), h2load.PATH, 1
        before = scrape(metrics_port) if metrics_port else None
        cpu0 = cpu_seconds(cpu_pid) if cpu_pid else 0.0
        fill = connections * streams
        if kind == "stream":
            # Streams run to completion (-n, a count sized from a warm-up run): h2load's
            # duration limit resets streams mid-flight, which crashes Triton 2.51
            # (SIGSEGV in TRITONSERVER_InferenceRequestDelete), and its --warm-up-time
            # counts no stream with a multi-frame body.
            warm = h2load.run_h2load(target, body, connections=connections, streams=streams,
                                     duration_s=max(p.warmup_s, 1.0), warmup_s=0, path=path,
                                     requests=fill * 8)
            count = max(fill, int(warm.reported_req_per_s * p.duration_s))
            warm_messages = warm.done * per
            run = h2load.run_h2load(target, body, connections=connections, streams=streams,
                                    duration_s=p.duration_s, warmup_s=0, path=path,
                                    requests=count)
        else:
            run = h2load.run_h2load(target, body, connections=connections, streams=streams,
                                    duration_s=p.duration_s, warmup_s=p.warmup_s, path=path)
            warm_messages = int(run.reported_req_per_s * p.warmup_s)
        cpu = cpu_seconds(cpu_pid) - cpu0 if cpu_pid else 0.0
        errors = dict(run.http_errors)
        if run.errored or run.timed_out:
            errors["h2load errored/timeout"] = run.errored + run.timed_out
        if before is not None and metrics_port:
            after = scrape(metrics_port)
            if after is not None:
                errors.update(after.since(before).errors(model))
                # What h2load cuts off when its time is up the gateway counts CANCELLED:
                # at most one request (or stream body) per open stream, not an error.
                if errors.get("CANCELLED", 0) <= connections * streams * per:
                    errors.pop("CANCELLED", None)
        lat = run.latencies_s
        messages = len(lat) * per
        # CPU over warm-up and measurement: the messages of both.
        total = warm_messages + run.done * per
        figure = Figure(
            at.server, model, kind, fill,
            messages / run.duration_s if run.duration_s else 0.0,
            sum(lat) / len(lat) * 1000 if lat else float("nan"),
            percentile(lat, 50) * 1000 if lat else float("nan"),
            cpu / total * 1e6 if cpu_pid and total else None, errors)
        self.figures.append(figure)
        print(row(figure), flush=True)
        return figure

    def check(self, target: str, model: str) -> bool:
        """One unary call and one short stream, both answered without error, before h2load
        (which cannot tell a gRPC error from an answer); False if the server does not
        implement ModelStreamInfer."""
        request = self.requests[model]
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stub.ModelInfer(request, timeout=30)
            try:
                answers = list(stub.ModelStreamInfer(iter([request] * 3), timeout=30))
            except grpc.RpcError as exc:
                if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                    return False
                raise
        bad = [a.error_message for a in answers if a.error_message]
        if len(answers) != 3 or bad:
            raise RuntimeError(f"{target} {model}: stream answered {len(answers)}/3, {bad}")
        return True

    def learn(self, target: str) -> None:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for model in ("mlp", "mlp_unbatched", "cnn"):
                meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=30)
                self.requests[model] = request_for(meta, batch=1)

    def server_levels(self, at: Endpoint, *, full: bool = True, stream: bool = True) -> None:
        streaming = all([self.check(at.target, m) for m in ("mlp", "mlp_unbatched", "cnn")])
        streaming = streaming and stream
        if full:
            self.level(at, "mlp", "unary", 1)
            self.level(at, "cnn", "unary", 1)
        self.level(at, "mlp", "unary", 32)
        if full:
            self.level(at, "mlp_unbatched", "unary", 32)
        if streaming:
            self.level(at, "mlp", "stream", 32)
        elif stream:
            print(f"{at.server}: ModelStreamInfer is not implemented", flush=True)


@contextlib.contextmanager
def triton(repository: Path, workdir: Path) -> Iterator[tuple[str, int]]:
    """tritonserver over ``repository`` (imported lazily: only a checkout with the test
    support has it); yields its target and pid."""
    from tests.support.triton_server import TritonServer, triton_install

    server = TritonServer(triton_install(), repository, workdir)
    server.start(120)
    assert server.proc is not None
    stubs = children(server.proc.pid)  # the Python-backend stubs, which outlive a crash
    try:
        yield server.target, server.proc.pid
    finally:
        server.stop()
        for pid in stubs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def noop_answer(target: str, request: pb.ModelInferRequest) -> bytes:
    with grpc.insecure_channel(target) as channel:
        answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    return bytes(answer.SerializeToString())


def run(plan: Plan, progress: Callable[[str], None] = print
        ) -> tuple[list[Figure], dict[str, object]]:
    bench = Bench(plan)
    with tempfile.TemporaryDirectory(prefix="modelgate-versus-") as folder:
        tmp = Path(folder)
        models = peer_models()
        store = write_store(tmp / "store", models)
        repository = write_triton_repository(tmp / "repo", models)
        (tmp / "empty").mkdir()
        progress("Triton, then the gateway forwarding to it")
        with triton(repository, tmp) as (upstream, triton_pid):
            bench.learn(upstream)
            bench.server_levels(Endpoint(TRITON, upstream, triton_pid), stream=False)
            flags = ["--triton", f"up={upstream},export=all"]
            with start_gateway(tmp / "empty", flags) as gw:
                fwd = Endpoint(FORWARD, gw.target, gw.pid, gw.metrics_port)
                streaming = all([bench.check(fwd.target, m) for m in ("mlp", "cnn")])
                bench.level(fwd, "mlp", "unary", 1)
                bench.level(fwd, "cnn", "unary", 1)
                bench.level(fwd, "mlp", "unary", 32)
                if streaming:
                    bench.level(fwd, "mlp", "stream", 32)
        # Triton's own streams last, each attempt on a fresh server: tritonserver 2.51 crashed
        # (SIGSEGV) under h2load streams in some runs; a run it did not finish is dropped.
        for attempt in range(1, 4):
            progress(f"Triton, ModelStreamInfer (attempt {attempt})")
            with triton(repository, tmp) as (upstream, triton_pid):
                figure = bench.level(Endpoint(TRITON, upstream, triton_pid), "mlp", "stream", 32)
                crashed = not Path(f"/proc/{triton_pid}").exists() or bool(figure.errors)
            if not crashed:
                break
            bench.figures.remove(figure)
            after = "rerun on a fresh server" if attempt < 3 else "no attempt finished"
            bench.notes.append(f"tritonserver crashed during its stream level (attempt "
                               f"{attempt}, errors {figure.errors}): {after}")
        progress("modelgate, 1 worker")
        with start_gateway(store) as gw:
            bench.server_levels(Endpoint(MODELGATE, gw.target, gw.pid, gw.metrics_port))
            answer = noop_answer(gw.target, bench.requests["mlp"])
        progress("modelgate, 2 workers")
        with start_gateway(store, workers=2) as gw:
            bench.server_levels(Endpoint(MODELGATE_2, gw.target, gw.pid, gw.metrics_port),
                                full=False)
        for name, workers in ((NOOP, 1), (NOOP_2, 2)):
            progress(name)
            with start_noop(free_port(), answer, workers) as noop:
                at = Endpoint(name, noop.target, noop.pid)
                bench.level(at, "mlp", "unary", 32)
                bench.level(at, "mlp", "stream", 32)
    where = machine()
    where["notes"] = bench.notes
    return bench.figures, where


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.versus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the report")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per level")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--messages", type=int, default=4,
                        help="messages per h2load stream body (in flight per stream)")
    args = parser.parse_args(argv)
    if not 0 < args.duration <= 120 or not 0 <= args.warmup <= 30:
        parser.error("--duration must lie in (0, 120], --warmup in [0, 30]")
    if h2load.binary() is None:
        parser.error("h2load not found (scripts/install_test_deps.sh installs nghttp2-client)")
    began = time.monotonic()
    figures, where = run(Plan(args.duration, args.warmup, messages=args.messages))
    where["command"] = " ".join([".venv/bin/python -m loadtests.versus",
                                 *(sys.argv[1:] if argv is None else argv)])
    where["seconds"] = round(time.monotonic() - began)
    write(args.out, figures, where)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
