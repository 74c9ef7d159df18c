"""`modelgate serve --workers N`: N real processes share the port; one that dies is restarted
while the others keep answering; SIGTERM drains them all and exits 0."""

from __future__ import annotations

import functools
import os
import re
import signal
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.grpc as tc
from prometheus_client.parser import text_string_to_metric_families

from gateway.process.metrics_fanin import merge_expositions
from tests.hardening.raw_http import exchange
from tests.support.gateway import GatewayProcess, free_port
from tests.support.waiting import wait_until

# Worker processes import the whole gateway each; give them a minute on a loaded machine.
_wait_for = functools.partial(wait_until, timeout=60)


def _workers(gw: GatewayProcess) -> list[int]:
    """Pids of the live worker processes, as the supervisor logged them."""
    pids = [int(p) for p in re.findall(r"worker \d+ started \(pid (\d+)\)", gw.log())]
    return [p for p in pids if _alive(p)]


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text().lower()

def _infer_ok(target: str) -> bool:
    # A new client per call: a new connection, which the kernel may hand to either worker.
    client = tc.InferenceServerClient(target)
    try:
        x = tc.InferInput("features", [1, 4], "FP32")
        x.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2]], np.float32))
        return client.infer("iris", [x], client_timeout=10).as_numpy("label").tolist() == [[0]]
    finally:
        client.close()


def _infer_ok_or_false(target: str) -> bool:
    try:
        return _infer_ok(target)
    except Exception:
        return False


def test_workers_share_the_port_restart_and_drain() -> None:
    with GatewayProcess(["--workers", "2"]) as gw:
        _wait_for(lambda: len(_workers(gw)) >= 2)
        # Both workers must be ready before one is killed, or the survivor may still load.
        _wait_for(lambda: gw.log().count("modelgate serving") >= 2)
        workers = _workers(gw)
        assert len(workers) == 2, gw.log()
        assert all(_infer_ok(gw.target) for _ in range(10))

        os.kill(workers[0], signal.SIGKILL)
        # Connections queued on the killed worker's socket are reset with it; new ones reach
        # the survivor while the supervisor restarts the dead one.
        _wait_for(lambda: _infer_ok_or_false(gw.target))
        _wait_for(lambda: "restarting" in gw.log())
        _wait_for(lambda: gw.log().count("modelgate serving") >= 3)
        replacement = set(_workers(gw)) - set(workers)
        assert len(replacement) == 1, gw.log()
        assert all(_infer_ok(gw.target) for _ in range(10))

        code = gw.stop()
        assert code == 0, gw.log()
        assert "all workers stopped" in gw.log()
        assert not any(_alive(pid) for pid in [*workers, *replacement])


def test_workers_stop_when_the_supervisor_is_killed() -> None:
    with GatewayProcess(["--workers", "2"]) as gw:
        _wait_for(lambda: len(_workers(gw)) >= 2)
        workers = _workers(gw)
        gw.proc.kill()  # SIGKILL: the supervisor cannot forward anything
        gw.proc.wait(10)
        _wait_for(lambda: not any(_alive(pid) for pid in workers), timeout=60)


def _scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _iris_requests(text: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (sample.name == "modelgate_inference_requests_total"
                    and sample.labels.get("model") == "iris"):
                total += sample.value
    return total


def test_metrics_of_all_workers_are_merged_on_the_one_port() -> None:
    metrics_port = free_port()
    with GatewayProcess(["--workers", "2", "--metrics-port", str(metrics_port)]) as gw:
        _wait_for(lambda: gw.log().count("modelgate serving") >= 2)
        _wait_for(lambda: _scrape(metrics_port, "/readyz")[0] == 200)
        for _ in range(20):
            assert _infer_ok(gw.target)
        status, text = _scrape(metrics_port)
        assert status == 200
        # Each request was counted by exactly one worker; the merged count is the total.
        assert _iris_requests(text) == 20
        assert _scrape(metrics_port, "/healthz")[0] == 200
        # The supervisor's port is the workers' HTTP stack, with the same limit on a head.
        huge = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 20_000 + b"\r\n\r\n"
        assert exchange(metrics_port, huge).statuses == [431]
        assert gw.stop() == 0


def test_merge_sums_equal_series_and_keeps_the_earliest_start() -> None:
    worker = (
        "# HELP x_total things\n# TYPE x_total counter\nx_total{model=\"a\"} {n}\n"
        "# HELP process_start_time_seconds start\n# TYPE process_start_time_seconds gauge\n"
        "process_start_time_seconds {t}\n"
    )
    merged = merge_expositions([
        worker.replace("{n}", "3").replace("{t}", "200"),
        worker.replace("{n}", "4").replace("{t}", "100"),
    ]).decode()
    assert 'x_total{model="a"} 7.0' in merged
    assert "process_start_time_seconds 100.0" in merged


def test_a_worker_orphaned_before_it_started_still_stops() -> None:
    """The supervisor may die while a worker is still importing: the worker must not mistake
    init for its supervisor."""
    import multiprocessing

    from gateway.process.workers import _worker_main
    from gateway.settings import Settings

    settings = Settings(grpc_port=free_port(), metrics_port=0, workers="1")
    context = multiprocessing.get_context("spawn")
    # A pid that is certainly not this process's parent: the worker is orphaned from birth.
    gone = context.Process(target=int)
    gone.start()
    gone.join()
    worker = context.Process(
        target=_worker_main, args=(settings, 0, context.Queue(), gone.pid), daemon=True
    )
    worker.start()
    worker.join(60)
    assert not worker.is_alive()
