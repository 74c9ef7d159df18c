"""Fairness under attack, against the real ``modelgate serve`` process: one tenant holds 300
open, idle streams (more than the whole in-flight cap, had each stream held a slot) and sends
chunked junk to the REST port (with its key and without) as fast as it can, while another
tenant sends inference requests at a modest rate over gRPC and REST. Every one of the
victim's requests must succeed; their latency is recorded (p99 printed, see
docs/security.md), never asserted. The server's memory is sampled and bounded as well."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc
from tests.gateway.tenancy.test_tenants import admin, issue
from tests.hardening.raw_http import GOOD_BODY, INFER, chunked_head, exchange, post, tiny_chunks
from tests.support.gateway import GatewayProcess, free_port
from tests.support.memory import RssGrowth

pytestmark = pytest.mark.timeout(300)

VICTIM_REQUESTS = 200  # half gRPC, half REST
VICTIM_INTERVAL_S = 0.05  # a modest 20 requests a second
MEMORY_BOUND = 96 << 20


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def message(request_id: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="add", id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.full((1, 4), 2.0, dtype=np.float32).tobytes())
    return request


class Attack:
    """The attacker's traffic, from a process of its own (its own interpreter and gRPC core,
    as a real attacker's would be), until the context ends; then its counts."""

    def __init__(self, target: str, http_port: int, key: str) -> None:
        context = multiprocessing.get_context("spawn")
        self.stop = context.Event()
        self._results: multiprocessing.Queue[tuple[int, dict[int, int]]] = context.Queue()
        self._process = context.Process(target=attack, daemon=True, args=(
            target, http_port, key, self.stop, self._results))
        self.stream_answers = 0
        self.rest_answers: dict[int, int] = {}

    def __enter__(self) -> Attack:
        self._process.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        try:
            self.stream_answers, self.rest_answers = self._results.get(timeout=120)
        finally:
            self._process.join(30)
            if self._process.is_alive():
                self._process.kill()


def attack(target: str, http_port: int, key: str, stop: Any, results: Any) -> None:
    """The attacking process: idle streams, and three threads sending chunked junk as fast
    as the server answers (two with the attacker's key, one without)."""
    rest_answers: dict[int, int] = {}
    streams = [0]

    def junk(with_key: bool) -> None:
        headers = {"x-api-key": key} if with_key else {}
        payload = chunked_head(INFER, headers) + tiny_chunks(256 << 10)
        while not stop.is_set():
            for status in exchange(http_port, payload).statuses:
                rest_answers[status] = rest_answers.get(status, 0) + 1

    threads = [threading.Thread(target=junk, args=(with_key,), daemon=True)
               for with_key in (True, False, True)]
    for thread in threads:
        thread.start()
    asyncio.run(_stream_attack(target, key, stop, streams))
    for thread in threads:
        thread.join(60)
    results.put((streams[0], rest_answers))


async def _stream_attack(target: str, key: str, stop: Any, answers: list[int]) -> None:
    """Streams on five connections, sixty each: every one has a message answered, so the
    server holds it open, then sends nothing until the attack ends."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(5)]
    calls = [pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(metadata=bearer(key))
             for channel in channels for _ in range(60)]

    async def first(call: Any) -> None:
        try:
            await call.write(message("first"))
            await call.read()
        except grpc.aio.AioRpcError:
            return  # refused at open: not counted
        answers[0] += 1

    await asyncio.gather(*(first(call) for call in calls))
    await asyncio.get_running_loop().run_in_executor(None, stop.wait)
    for call in calls:
        call.cancel()
    for channel in channels:
        await channel.close(None)


def victim(target: str, http_port: int, key: str) -> tuple[list[float], list[str]]:
    """The victim's requests at a fixed pace: latencies of successes, and any failures."""
    latencies: list[float] = []
    failures: list[str] = []
    calls: list[Callable[[], bool]] = []
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def unary() -> bool:
            try:
                return bool(stub.ModelInfer(message(), metadata=bearer(key), timeout=30).outputs)
            except grpc.RpcError as exc:
                failures.append(f"gRPC {exc.code().name}: {exc.details()}")
                return False

        def rest() -> bool:
            done = exchange(http_port, post(INFER, GOOD_BODY, {"x-api-key": key}, close=True))
            if done.statuses != [200]:
                failures.append(f"REST {done.statuses}: {done.raw[-200:]!r}")
            return done.statuses == [200]

        calls = [unary, rest]
        pace = time.monotonic()
        for i in range(VICTIM_REQUESTS):
            start = time.perf_counter()
            if calls[i % 2]():
                latencies.append(time.perf_counter() - start)
            pace += VICTIM_INTERVAL_S
            time.sleep(max(0.0, pace - time.monotonic()))  # pacing, not waiting for an event
    return latencies, failures


def test_a_tenant_attacking_with_streams_and_junk_does_not_starve_another(
    hardening_store: Path, tmp_path: Path
) -> None:
    tenants = tmp_path / "tenants.toml"
    assert admin(tenants, "create", "attacker", "--models", "*", "--concurrent", "2")[0] == 0
    assert admin(tenants, "create", "victim", "--models", "*")[0] == 0
    attacker, victim_key = issue(tenants, "attacker"), issue(tenants, "victim")
    http_port = free_port()
    with GatewayProcess(["--store", str(hardening_store), "--tenants", str(tenants),
                         "--http-port", str(http_port),
                         "--max-message-bytes", str(1 << 20)]) as proc:
        # Warm both paths before measuring.
        victim(proc.target, http_port, victim_key)
        with RssGrowth(proc.proc.pid) as growth, Attack(proc.target, http_port,
                                                         attacker) as attack:
            latencies, failures = victim(proc.target, http_port, victim_key)
    assert latencies, failures[:5]
    ordered = sorted(latencies)
    p50, p99 = ordered[len(ordered) // 2], ordered[int(len(ordered) * 0.99) - 1]
    print(f"\nvictim under attack: {len(latencies)} of {VICTIM_REQUESTS} requests answered, "
          f"p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, max {ordered[-1] * 1e3:.1f} ms; "
          f"attacker: {attack.stream_answers} streams, REST {attack.rest_answers}; "
          f"RSS growth {growth.peak_kib >> 10} MiB")
    assert failures == []
    assert len(latencies) == VICTIM_REQUESTS
    # The attack ran alongside: every stream was opened and its junk refused.
    assert attack.stream_answers == 300
    assert set(attack.rest_answers) <= {400, 401}, attack.rest_answers
    assert attack.rest_answers.get(400, 0) > 0 and attack.rest_answers.get(401, 0) > 0
    assert growth.peak_kib < MEMORY_BOUND >> 10, growth.peak_kib
