"""What a load phase does to everyone else: health probes sent from a separate process (so the
load generator's own event loop never delays them) and the gateway's memory, sampled."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc

START_TIMEOUT_S = 60.0
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ProbeResults:
    """The probes of one phase: each Health/Check or ServerReady call is one probe; a probe
    fails when it errs (its deadline passed: DEADLINE_EXCEEDED) or answers not serving."""

    sent: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # "Check DEADLINE_EXCEEDED": n
    latencies_ms: list[float] = field(default_factory=list)  # of the probes that passed

    @property
    def failed(self) -> int:
        return sum(self.failures.values())


async def _probe_round(
    health: health_pb2_grpc.HealthStub, stub: pb_grpc.GRPCInferenceServiceStub,
    deadline_s: float, results: ProbeResults,
) -> None:
    for name in ("Check", "ServerReady"):
        results.sent += 1
        start = time.perf_counter()
        try:
            if name == "Check":
                answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=deadline_s)
                passed = answer.status == health_pb2.HealthCheckResponse.SERVING
            else:
                passed = (await stub.ServerReady(pb.ServerReadyRequest(),
                                                 timeout=deadline_s)).ready
            problem = "" if passed else "not serving"
        except grpc.RpcError as exc:
            code = exc.code()
            problem = code.name if isinstance(code, grpc.StatusCode) else str(code)
        if problem:
            key = f"{name} {problem}"
            results.failures[key] = results.failures.get(key, 0) + 1
        else:
            results.latencies_ms.append(round((time.perf_counter() - start) * 1000, 2))


async def _probe_loop(target: str, interval_s: float, deadline_s: float) -> None:
    """The child's side: commands on stdin (begin, end, quit), ready and each phase's
    results as JSON lines on stdout."""
    commands: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in sys.stdin:
            commands.put(line.strip())
        commands.put("quit")

    threading.Thread(target=read, name="commands", daemon=True).start()
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await stub.ServerReady(pb.ServerReadyRequest(), timeout=START_TIMEOUT_S)  # connected
        print("ready", flush=True)
        results: ProbeResults | None = None
        while True:
            try:
                # Idle: wait for a command. Probing: only look between rounds.
                command = (await asyncio.to_thread(commands.get) if results is None
                           else commands.get_nowait())
            except queue.Empty:
                assert results is not None
                await _probe_round(health, stub, deadline_s, results)
                await asyncio.sleep(interval_s)
                continue
            if command == "begin":
                results = ProbeResults()
            elif command in ("end", "peek"):  # peek: the phase so far, and it goes on
                print(json.dumps(asdict(results or ProbeResults())), flush=True)
                if command == "end":
                    results = None
            else:
                return


class Prober:
    """A child process (``python -m loadtests.probes``) probing ``target`` with
    grpc.health.v1.Health/Check and ServerReady every ``interval_s``, each with a
    ``deadline_s``, between begin() and end()."""

    def __init__(self, target: str, interval_s: float = 0.2, deadline_s: float = 1.0) -> None:
        self.target, self.interval_s, self.deadline_s = target, interval_s, deadline_s
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Prober:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "loadtests.probes", self.target, str(self.interval_s),
             str(self.deadline_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT,
        )
        if self._line(START_TIMEOUT_S) != "ready":
            self._stop()
            raise RuntimeError("the prober did not connect to the gateway")
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stop()

    def _send(self, command: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()

    def _line(self, timeout_s: float) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout_s)
        return self._proc.stdout.readline().strip() if ready else ""

    def _stop(self) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self._send("quit")
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(10)

    def begin(self) -> None:
        self._send("begin")

    def end(self) -> ProbeResults:
        return self._report("end")

    def peek(self) -> ProbeResults:
        """The results of the phase so far; probing goes on."""
        return self._report("peek")

    def _report(self, command: str) -> ProbeResults:
        self._send(command)
        # A round in progress ends within two deadlines.
        line = self._line(2 * self.deadline_s + self.interval_s + 30)
        if not line:
            raise RuntimeError("the prober did not report")
        data = json.loads(line)
        return ProbeResults(data["sent"], data["failures"], data["latencies_ms"])


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def rss_kib(pid: int) -> int:
    """Resident memory of a process now (Linux)."""
    return _status_kib(pid, "VmRSS:")


def peak_rss_kib(pid: int) -> int:
    """The most resident memory the process has had since it started (Linux VmHWM)."""
    return _status_kib(pid, "VmHWM:")


@dataclass
class Watch:
    """What happened around one phase: probe results, RSS samples (every 100 ms) and how
    far the gateway's peak RSS rose above its peak before the phase."""

    probes: ProbeResults = field(default_factory=ProbeResults)
    rss_kib: list[int] = field(default_factory=list)
    peak_growth_kib: int = 0


@contextlib.contextmanager
def watching(prober: Prober | None, pid: int | None) -> Iterator[Watch]:
    """Probes and memory samples for the duration of the ``with`` block."""
    watch = Watch()
    stop = threading.Event()
    peak_before = peak_rss_kib(pid) if pid else 0

    def sample() -> None:
        assert pid is not None
        while not stop.wait(0.1):
            with contextlib.suppress(OSError):
                watch.rss_kib.append(rss_kib(pid))

    sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    if pid:
        sampler.start()
    if prober is not None:
        prober.begin()
    try:
        yield watch
    finally:
        stop.set()
        if pid:
            sampler.join(5)
            with contextlib.suppress(OSError):
                watch.rss_kib.append(rss_kib(pid))
                watch.peak_growth_kib = peak_rss_kib(pid) - peak_before
        if prober is not None:
            watch.probes = prober.end()


if __name__ == "__main__":
    asyncio.run(_probe_loop(sys.argv[1], float(sys.argv[2]), float(sys.argv[3])))
