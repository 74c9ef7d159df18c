"""Faults real parts can be put into on cue: a paused (SIGSTOP) redis-server under the
quota store, a model file corrupted on disk while the store is polled, and SIGTERM to
``modelgate serve`` under load."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from gateway.quota.redis_store import RedisQuotaStore
from loadtests.overload import slow_store
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc
from tests.gateway.tenancy.test_tenants import admin, issue
from tests.support import models
from tests.support.gateway import GatewayProcess, running_gateway
from tests.support.redis_server import RedisServer, fresh_redis
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(240)


def add_request(x: np.ndarray, model: str = "add") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype(np.float32).tobytes())
    return request


def y_of(response: pb.ModelInferResponse) -> np.ndarray:
    names = [o.name for o in response.outputs]
    return np.frombuffer(response.raw_output_contents[names.index("y")], np.float32)

# ---- Redis paused ---------------------------------------------------------------------

@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    yield from fresh_redis()


@pytest.mark.parametrize("mode", ["fail-open", "fail-closed"])
def test_a_paused_redis_never_holds_a_request_past_its_deadline(
    hardening_store: Path, tmp_path: Path, redis_server: RedisServer, mode: str
) -> None:
    path = tmp_path / "tenants.toml"
    # Under a concurrency limit, a request that finds none of its process's held slots
    # free asks Redis for more: once the spares went back, the next one meets the paused
    # server.
    assert admin(path, "create", "t", "--concurrent", "64", "--requests-per-s", "1000")[0] == 0
    key = issue(path, "t")
    with running_gateway(hardening_store, tenants=path, redis_url=redis_server.url,
                         redis_failure_mode=mode) as gw:
        quota = gw.gateway.quota
        assert isinstance(quota, RedisQuotaStore)

        async def burst(count: int, deadline_s: float) -> list[grpc.StatusCode]:
            async with grpc.aio.insecure_channel(gw.target) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)

                async def one() -> grpc.StatusCode:
                    try:
                        await stub.ModelInfer(add_request(np.ones((1, 4))), timeout=deadline_s,
                                              metadata=(("x-api-key", key),))
                    except grpc.RpcError as exc:
                        code = exc.code()
                        assert isinstance(code, grpc.StatusCode)
                        return code
                    return grpc.StatusCode.OK

                return list(await asyncio.gather(*(one() for _ in range(count))))

        assert set(asyncio.run(burst(8, 5.0))) == {grpc.StatusCode.OK}
        wait_until(lambda: quota.slots.held() == 0)  # the keeper gave the spares back
        assert redis_server.proc is not None
        os.kill(redis_server.proc.pid, signal.SIGSTOP)  # accepts connections, never answers
        try:
            expected = grpc.StatusCode.OK if mode == "fail-open" else grpc.StatusCode.UNAVAILABLE
            codes = asyncio.run(burst(16, 3.0))
            # The gateway answered each itself, before the client's deadline: serving under
            # local limits (fail-open) or UNAVAILABLE (fail-closed); none ran out of time.
            assert set(codes) == {expected}, codes
            assert not quota.available and quota.outages == 1
            # Still paused, after the store has probed it in the background a few times
            # (each probe meets the silent socket): requests still never wait for it.
            probed = quota.failed_probes
            wait_until(lambda: quota.failed_probes >= probed + 2, "two more failed probes")
            assert set(asyncio.run(burst(16, 3.0))) == {expected}
            assert not quota.available and quota.outages == 1
            # aio's abort sends the status before the handler unwinds: settles at once.
            wait_until(lambda: gw.gateway.inflight.inflight == 0, timeout=5)
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        wait_until(lambda: quota.available)
        assert set(asyncio.run(burst(8, 5.0))) == {grpc.StatusCode.OK}


# ---- a model file corrupted during a reload -------------------------------------------

def test_a_model_corrupted_on_disk_leaves_the_old_version_serving(tmp_path: Path) -> None:
    store = tmp_path / "store"
    models.write_model(store, "add", 1, models.add_constant(1.0), models.add_model_config("add"))
    model_file = store / "add" / "1" / "model.onnx"
    good = model_file.read_bytes()
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    with running_gateway(store, poll_interval=0.1) as gw:

        def traffic() -> None:
            with grpc.insecure_channel(gw.target) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                x = np.arange(8, dtype=np.float32).reshape(2, 4)
                while not stop.is_set():
                    try:
                        response = stub.ModelInfer(add_request(x), timeout=10)
                        if not np.array_equal(y_of(response), x.reshape(-1) + 1):
                            failures.append("wrong answer")
                        if response.model_version != "1":
                            failures.append(f"answered by version {response.model_version}")
                        answered[0] += 1
                    except grpc.RpcError as exc:
                        failures.append(f"{exc.code()}: {exc.details()}")

        def reasons() -> list[str]:
            index = gw.stub().RepositoryIndex(pb.RepositoryIndexRequest())
            return [m.reason for m in index.models if m.name == "add"]

        thread = threading.Thread(target=traffic)
        thread.start()
        try:
            wait_until(lambda: answered[0] > 10)
            # Half a file, as a copy interrupted mid-write leaves it.
            model_file.write_bytes(good[: len(good) // 2])
            wait_until(lambda: any("replacement failed" in r for r in reasons()))
            # A new version that cannot load: the latest policy wants it, v1 keeps serving.
            models.write_model(store, "add", 2, b"\x00garbage", None)
            wait_until(lambda: any(r.startswith("load failed") for r in reasons()))
            served_before = answered[0]
            wait_until(lambda: answered[0] > served_before + 10)
        finally:
            stop.set()
            thread.join(30)
        assert not failures, failures[:5]
        for reason in reasons():
            assert str(store) not in reason and str(tmp_path) not in reason, reason


# ---- SIGTERM under load ---------------------------------------------------------------

def test_sigterm_under_load_loses_no_response(tmp_path: Path) -> None:
    store = slow_store(tmp_path / "store", layers=64)
    access = tmp_path / "access.jsonl"
    ok: list[str] = []
    answered_at: list[float] = []
    errors: list[str] = []
    signalled_at: list[float] = []
    with GatewayProcess(["--store", str(store), "--access-log", str(access),
                         "--grace-period-s", "20"]) as proc:

        async def load(stop_at: float | None) -> None:
            async with grpc.aio.insecure_channel(proc.target) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                x = np.ones((1, 512), np.float32)

                async def caller(index: int) -> None:
                    sequence = 0
                    while True:
                        request = add_request(x, "slow")
                        request.id = f"{index}-{sequence}"
                        sequence += 1
                        try:
                            response = await stub.ModelInfer(request, timeout=30)
                        except grpc.RpcError as exc:
                            errors.append(exc.code().name)
                            return  # the server stopped taking requests
                        assert response.id == request.id
                        ok.append(response.id)
                        answered_at.append(time.monotonic())

                await asyncio.gather(*(caller(i) for i in range(16)))

        def terminate_soon() -> None:
            wait_until(lambda: len(ok) > 50)
            signalled_at.append(time.monotonic())
            proc.proc.send_signal(signal.SIGTERM)

        killer = threading.Thread(target=terminate_soon)
        killer.start()
        asyncio.run(load(None))
        killer.join(30)
        assert proc.proc.wait(60) == 0
        log = proc.log()
    entries = [json.loads(line) for line in access.read_text().splitlines()]
    infer = [e for e in entries if e["method"] == "ModelInfer"]
    # Every request the server took in was answered OK and reached its caller (the access
    # log counts each RPC that reached the gateway). Callers were only turned away once it
    # had stopped taking requests: UNAVAILABLE (connection refused or GOAWAY), or CANCELLED
    # for a request that raced gRPC core's shutdown and never reached a handler.
    assert {e["code"] for e in infer} == {"OK"}, log[-2000:]
    assert len(infer) == len(ok)
    assert set(errors) <= {"UNAVAILABLE", "CANCELLED"}, errors
    assert len(errors) == 16
    # Requests were in flight when the signal came (16 callers, each always waiting on
    # one): those were answered during the grace period, not dropped.
    assert sum(1 for t in answered_at if t > signalled_at[0]) >= 1
    assert "signal received: draining" in log
