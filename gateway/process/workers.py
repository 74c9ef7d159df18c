"""Multi-process serving: the supervisor starts N worker processes that share the gRPC port
(SO_REUSEPORT) and one quota table, restarts a worker that dies, and drains them all on
SIGTERM/SIGINT."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.process
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from gateway.http.listener import port_limits
from gateway.process.metrics_fanin import MetricsFanIn
from gateway.quota.table import QuotaTableError, QuotaTableFile, create_table
from gateway.settings import Settings

if TYPE_CHECKING:
    from gateway.process.server import Gateway

log = logging.getLogger(__name__)

# A worker that dies sooner than this after starting is crash-looping: back off before the
# next restart instead of spinning.
_HEALTHY_AFTER_S: Final = 10.0
_MAX_BACKOFF_S: Final = 10.0
_POLL_S: Final = 0.2

# A worker gets its settings, its index, a multiprocessing queue for (worker index, port of
# the worker's own metrics endpoint), sent once it serves, and the supervisor's pid.
WorkerMain = Callable[[Settings, int, Any, int], None]


def _worker_main(settings: Settings, index: int, ports: Any, supervisor: int) -> None:
    """Body of one worker process: serve until told to stop."""
    from gateway.process import event_loop
    from gateway.process.server import serve
    from gateway.sanitize import escape_log_lines

    logging.basicConfig(
        level=settings.log_level,
        format=f"%(asctime)s %(levelname)s [worker {index}] %(name)s: %(message)s",
    )
    escape_log_lines()
    _stop_when_orphaned(supervisor)

    def started(gateway: Gateway) -> None:
        ports.put((index, gateway.metrics_port))

    raise SystemExit(
        event_loop.run(serve(settings, worker_index=index, started=started), settings.event_loop)
    )


def _stop_when_orphaned(parent: int) -> None:
    """A worker whose supervisor died (even by SIGKILL, which it cannot forward) drains
    itself instead of holding the port forever. The supervisor's pid is passed in rather
    than read here: a supervisor that died while this process was still starting would
    otherwise leave init as the parent to watch."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_POLL_S)
        log.error("supervisor (pid %d) is gone; draining", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


@dataclasses.dataclass
class _Worker:
    index: int
    process: multiprocessing.process.BaseProcess
    started: float
    failures: int = 0


class Supervisor:
    """Keeps ``count`` workers running until stopped; returns the exit code from run()."""

    def __init__(self, settings: Settings, count: int, target: WorkerMain = _worker_main) -> None:
        self._settings = dataclasses.replace(settings, workers="1")
        self._count = count
        self._target = target
        # spawn, not fork: gRPC and ONNX Runtime threads do not survive a fork.
        self._context = multiprocessing.get_context("spawn")
        self._workers: dict[int, _Worker] = {}
        self._stopping = False
        self._ports_queue = self._context.Queue()
        self._metrics_ports: dict[int, int] = {}
        # The merged metrics port: the workers' HTTP stack and limits; no route takes a body.
        self._fan_in = MetricsFanIn(self._current_ports, count,
                                    port_limits(settings, max_body_bytes=0))

    def _current_ports(self) -> dict[int, int]:
        while True:
            try:
                index, port = self._ports_queue.get_nowait()
            except queue.Empty:
                break
            self._metrics_ports[index] = port
        return dict(self._metrics_ports)

    def _start(self, index: int, failures: int = 0) -> None:
        process = self._context.Process(
            target=self._target,
            args=(self._settings, index, self._ports_queue, os.getpid()),
            name=f"modelgate-worker-{index}",
        )
        self._metrics_ports.pop(index, None)
        process.start()
        self._workers[index] = _Worker(index, process, time.monotonic(), failures)
        log.info("worker %d started (pid %s)", index, process.pid)

    def request_stop(self, *_: object) -> None:
        """Signal handler: begin draining every worker."""
        self._stopping = True

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.request_stop)
        log.info("starting %d workers on %s:%d", self._count, self._settings.host,
                 self._settings.grpc_port)
        try:
            metrics_port = self._fan_in.start(self._settings.host, self._settings.metrics_port)
        except OSError as exc:
            log.error("setting 'metrics_port': cannot bind %s:%d: %s", self._settings.host,
                      self._settings.metrics_port, exc)
            return 2
        log.info("metrics of all workers on %s:%d", self._settings.host, metrics_port)
        table = self._create_quota_table()
        try:
            return self._supervise()
        finally:
            if table is not None:
                table.remove()

    def _create_quota_table(self) -> QuotaTableFile | None:
        """The table the workers share their in-process quotas through; none with Redis
        (which shares them already) or without tenants (nothing is limited)."""
        if self._settings.redis_url or self._settings.tenants is None:
            return None
        try:
            table = create_table(self._count)
        except (OSError, QuotaTableError) as exc:
            log.error("cannot create the shared quota table: %s; each worker enforces the "
                      "limits by itself", exc)
            return None
        log.info("workers share quotas through %s", table.path)
        self._settings = dataclasses.replace(self._settings, quota_table=table.path)
        return table

    def _supervise(self) -> int:
        for index in range(self._count):
            self._start(index)
        restart_at: dict[int, float] = {}
        while not self._stopping:
            time.sleep(_POLL_S)
            now = time.monotonic()
            for index, worker in list(self._workers.items()):
                if worker.process.is_alive() or index in restart_at:
                    continue
                lived = now - worker.started
                failures = 0 if lived >= _HEALTHY_AFTER_S else worker.failures + 1
                delay = min(_MAX_BACKOFF_S, 0.5 * 2**failures) if failures else 0.0
                log.error("worker %d (pid %s) exited with code %s after %.1fs; restarting in "
                          "%.1fs", index, worker.process.pid, worker.process.exitcode, lived,
                          delay)
                worker.failures = failures
                restart_at[index] = now + delay
            for index, when in list(restart_at.items()):
                if now >= when and not self._stopping:
                    del restart_at[index]
                    self._start(index, self._workers[index].failures)
        return self._drain()

    def _drain(self) -> int:
        log.info("stopping %d workers (grace period %.1fs)", len(self._workers),
                 self._settings.grace_period_s)
        for worker in self._workers.values():
            if worker.process.is_alive() and worker.process.pid is not None:
                worker.process.terminate()  # SIGTERM: each worker drains its own requests
        give_up = time.monotonic() + self._settings.grace_period_s + 10.0
        for worker in self._workers.values():
            worker.process.join(max(0.0, give_up - time.monotonic()))
        code = 0
        for worker in self._workers.values():
            if worker.process.is_alive():
                log.error("worker %d did not stop in time; killing it", worker.index)
                worker.process.kill()
                worker.process.join(5)
                code = 1
        self._fan_in.stop()
        log.info("all workers stopped")
        return code
