"""The processes the benchmarks start on loopback and stop again: ``modelgate serve`` (one
or several workers), a private redis-server; plus their CPU time and the gateway's counters."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc

READY_TIMEOUT_S = 120.0


def free_port() -> int:
    """A currently free loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Served:
    """A running ``modelgate serve``: its gRPC target, supervisor pid and metrics port."""

    target: str
    pid: int
    metrics_port: int


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 30 s."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def start_gateway(
    store: Path | None, extra: Sequence[str] = (), *, workers: int = 1,
    source: Path | None = None,
) -> Iterator[Served]:
    """``modelgate serve`` on a free loopback port (the demo store when ``store`` is None);
    yields once every worker is ready, and stops it afterwards. With ``source``, the code
    served is that checkout's (another revision's worktree), run by this interpreter."""
    port, metrics_port = free_port(), free_port()
    command = [sys.executable, "-m", "gateway.process.cli", "serve", "--host", "127.0.0.1",
               "--grpc-port", str(port), "--metrics-port", str(metrics_port),
               "--log-level", "WARNING", "--workers", str(workers),
               *(["--store", str(store)] if store else []), *extra]
    if source is None:
        proc = subprocess.Popen(command)
    else:
        # PYTHONPATH comes before the editable install's finder, so the checkout's own
        # packages are the ones imported.
        env = {**os.environ, "PYTHONPATH": str(source)}
        proc = subprocess.Popen(command, cwd=source, env=env)
    target = f"127.0.0.1:{port}"
    try:
        give_up = time.monotonic() + READY_TIMEOUT_S
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"gateway exited with {proc.returncode}")
                with contextlib.suppress(grpc.RpcError):
                    if stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready:
                        break
                if time.monotonic() > give_up:
                    raise TimeoutError(f"gateway not ready after {READY_TIMEOUT_S:.0f} s")
                time.sleep(0.2)
        # One worker's ServerReady says nothing of the others; the supervisor's /readyz
        # answers 200 only once all of them are. (A lone server has the same endpoint.)
        readyz = f"http://127.0.0.1:{metrics_port}/readyz"
        while _http_status(readyz) != 200:
            if proc.poll() is not None or time.monotonic() > give_up:
                raise TimeoutError("gateway workers not all ready")
            time.sleep(0.2)
        yield Served(target, proc.pid, metrics_port)
    finally:
        stop_process(proc)


@contextlib.contextmanager
def served_gateway(store: Path | None, extra: Sequence[str] = ()) -> Iterator[tuple[str, int]]:
    """``modelgate serve`` on a free loopback port; yields (target, pid) once ready."""
    with start_gateway(store, extra) as served:
        yield served.target, served.pid


@contextlib.contextmanager
def gateway_process(store: Path, extra: Sequence[str] = ()) -> Iterator[str]:
    """``modelgate serve`` on a free loopback port; yields its target once ready."""
    with start_gateway(store, extra) as served:
        yield served.target


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def redis_process() -> Iterator[str]:
    """A private redis-server on a free loopback port, without persistence; yields its URL
    once it answers PING."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found (scripts/install_test_deps.sh installs it)")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="modelgate-bench-redis-") as folder:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", folder],
            stdout=subprocess.DEVNULL,
        )
        try:
            give_up = time.monotonic() + 10
            while not _ping(port):
                if proc.poll() is not None or time.monotonic() > give_up:
                    raise RuntimeError("redis-server did not answer PING")
                time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            stop_process(proc)


def children(pid: int) -> list[int]:
    """The pids of the direct children of ``pid`` (Linux /proc)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its descendants so far, from /proc (Linux):
    the gateway's and the no-op server's workers are child processes."""
    ticks = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        with contextlib.suppress(OSError, IndexError, ValueError):
            # Fields after the parenthesised command name; utime and stime are 14 and 15.
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        pending += children(current)
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class Counters:
    """What a gateway's /metrics counts so far: answers by (model, code), rows, batches."""

    answers: Counter[tuple[str, str]] = field(default_factory=Counter)
    rows: Counter[str] = field(default_factory=Counter)
    batches: Counter[str] = field(default_factory=Counter)

    def since(self, earlier: Counters) -> Counters:
        return Counters(self.answers - earlier.answers, self.rows - earlier.rows,
                        self.batches - earlier.batches)

    def errors(self, model: str) -> dict[str, int]:
        # Requests that never resolved to a model are counted under the empty name.
        return {code: n for (m, code), n in self.answers.items()
                if m in (model, "") and code != "OK" and n}


def scrape(metrics_port: int) -> Counters | None:
    """The gateway's counters (all workers merged by the supervisor), or None if its
    /metrics does not answer."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    counters = Counters()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            model = sample.labels.get("model", "")
            value = int(sample.value)
            if sample.name == "modelgate_inference_requests_total":
                counters.answers[(model, sample.labels.get("code", ""))] += value
            elif sample.name == "modelgate_inference_count_total":
                counters.rows[model] += value
            elif sample.name == "modelgate_inference_exec_count_total":
                counters.batches[model] += value
    return counters
