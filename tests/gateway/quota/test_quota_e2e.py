"""Quotas end to end: the real gateway (in-process, and two ``modelgate serve`` processes
sharing one real redis-server) with the in-process and the Redis store."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis
import tritonclient.grpc as tc

from gateway.quota.redis_store import RedisQuotaStore
from gateway.quota.store import DAY_S, LocalQuotaStore
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc
from tests.gateway.tenancy.test_tenants import admin, issue
from tests.support import models
from tests.support.gateway import GatewayProcess, RunningGateway, running_gateway
from tests.support.redis_server import RedisServer, fresh_redis
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(180)

# A batch forms only when 4 requests wait: fewer stay in flight as long as a test needs.
GATHER4 = (
    "dynamic_batching { preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 30000000 }\n"
)
WALL0 = 1_900_000_000.0


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    models.write_model(root, "add", 1, models.add_constant(1.0),
                       models.add_model_config("add", max_batch_size=64))
    models.write_model(root, "gather4", 1, models.add_constant(1.0),
                       models.add_model_config("gather4", max_batch_size=4, extra=GATHER4))
    return root


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from fresh_redis()


def tenants(path: Path, *specs: tuple[str, list[str]]) -> dict[str, str]:
    """Create tenants (id, extra ``create`` flags); returns id -> key."""
    keys = {}
    for tenant_id, flags in specs:
        assert admin(path, "create", tenant_id, *flags)[0] == 0
        keys[tenant_id] = issue(path, tenant_id)
    return keys


def request(model: str = "add", rows: int = 1) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="x", datatype="FP32", shape=[rows, 4])
    req.raw_input_contents.append(np.zeros((rows, 4), dtype=np.float32).tobytes())
    return req


def call(stub: pb_grpc.GRPCInferenceServiceStub, key: str, req: pb.ModelInferRequest,
         ) -> tuple[grpc.StatusCode, dict[str, str]]:
    """Send one request with the key; returns its status code and trailing metadata."""
    try:
        stub.ModelInfer(req, metadata=(("authorization", f"Bearer {key}"),), timeout=30)
    except grpc.RpcError as exc:
        return exc.code(), {m.key: str(m.value) for m in exc.trailing_metadata() or ()}
    return grpc.StatusCode.OK, {}

@pytest.fixture(params=["local", "redis"])
def limited(
    request: pytest.FixtureRequest, store: Path, tmp_path: Path, redis_server: RedisServer
) -> Iterator[tuple[RunningGateway, dict[str, str]]]:
    """A gateway with a few limited tenants, on either quota store."""
    path = tmp_path / "tenants.toml"
    keys = tenants(
        path,
        ("rate", ["--requests-per-s", "0.01", "--burst", "3"]),
        ("rows", ["--rows-per-s", "0.01", "--rows-burst", "8"]),
        ("few", ["--concurrent", "3"]),
        ("daily", ["--requests-per-day", "3"]),
        ("free", []),
    )
    overrides: dict[str, Any] = {"tenants": path}
    if request.param == "redis":
        redis_server.flush()
        overrides["redis_url"] = redis_server.url
    with running_gateway(store, **overrides) as gw:
        quota = gw.gateway.quota
        assert isinstance(quota, RedisQuotaStore if request.param == "redis" else LocalQuotaStore)
        quota.wall = lambda: WALL0
        yield gw, keys


def test_rate_limit_holds_with_a_retry_hint(
    limited: tuple[RunningGateway, dict[str, str]],
) -> None:
    gw, keys = limited
    stub = gw.stub()
    assert [call(stub, keys["rate"], request())[0] for _ in range(3)] == [grpc.StatusCode.OK] * 3
    code, trailers = call(stub, keys["rate"], request())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert trailers["modelgate-limit"] == "requests_per_s"
    assert int(trailers["retry-after-ms"]) > 0
    assert call(stub, keys["free"], request())[0] == grpc.StatusCode.OK  # others unaffected


def test_rows_per_second_charge_the_batch_size(
    limited: tuple[RunningGateway, dict[str, str]],
) -> None:
    gw, keys = limited
    stub = gw.stub()
    assert call(stub, keys["rows"], request(rows=6))[0] == grpc.StatusCode.OK
    code, trailers = call(stub, keys["rows"], request(rows=6))
    assert (code, trailers["modelgate-limit"]) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                   "rows_per_s")
    assert call(stub, keys["rows"], request(rows=2))[0] == grpc.StatusCode.OK


def test_more_rows_than_the_burst_never_pass_and_get_no_retry_hint(
    limited: tuple[RunningGateway, dict[str, str]],
) -> None:
    gw, keys = limited
    stub = gw.stub()
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request(rows=9), metadata=(("x-api-key", keys["rows"]),), timeout=30)
    error: Any = info.value
    trailers = {m.key: str(m.value) for m in error.trailing_metadata() or ()}
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "a request of 9 rows can never pass a limit of 8 rows" in error.details()
    assert trailers["modelgate-limit"] == "rows_burst"
    assert "retry-after-ms" not in trailers
    assert call(stub, keys["rows"], request(rows=8))[0] == grpc.StatusCode.OK  # charged nothing


def test_concurrency_limit_holds(limited: tuple[RunningGateway, dict[str, str]]) -> None:
    gw, keys = limited
    stub = gw.stub()
    with ThreadPoolExecutor(4) as pool:
        # Three requests wait in the queue for a fourth: three in flight.
        held = [pool.submit(call, stub, keys["few"], request("gather4")) for _ in range(3)]
        wait_until(lambda: _batcher_pending(gw, "gather4") == 3)
        code, trailers = call(stub, keys["few"], request("gather4"))
        assert (code, trailers["modelgate-limit"]) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                       "concurrent")
        # Another tenant's request completes the batch; the slots free.
        assert call(stub, keys["free"], request("gather4"))[0] == grpc.StatusCode.OK
        assert [f.result(30)[0] for f in held] == [grpc.StatusCode.OK] * 3
    with ThreadPoolExecutor(4) as pool:
        again = pool.submit(call, stub, keys["few"], request("gather4"))
        wait_until(lambda: _batcher_pending(gw, "gather4") == 1)
        fill = [pool.submit(call, stub, keys["free"], request("gather4")) for _ in range(3)]
        assert again.result(30)[0] == grpc.StatusCode.OK
        assert all(f.result(30)[0] == grpc.StatusCode.OK for f in fill)


def test_daily_quota_holds_and_resets_at_midnight(
    limited: tuple[RunningGateway, dict[str, str]],
) -> None:
    gw, keys = limited
    stub = gw.stub()
    wall = [WALL0]
    gw.gateway.quota.wall = lambda: wall[0]  # type: ignore[attr-defined]
    assert [call(stub, keys["daily"], request())[0] for _ in range(3)] == [
        grpc.StatusCode.OK] * 3
    code, trailers = call(stub, keys["daily"], request())
    assert (code, trailers["modelgate-limit"]) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                   "requests_per_day")
    assert int(trailers["retry-after-ms"]) == (DAY_S - WALL0 % DAY_S) * 1000  # to midnight
    wall[0] += DAY_S
    assert [call(stub, keys["daily"], request())[0] for _ in range(3)] == [
        grpc.StatusCode.OK] * 3
    assert call(stub, keys["daily"], request())[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_queue_full_rejections_give_tokens_back(
    store: Path, tmp_path: Path,
) -> None:
    config = models.add_model_config(
        "tiny_queue", max_batch_size=4,
        extra="dynamic_batching { preferred_batch_size: [ 4 ] max_queue_delay_microseconds: "
              "30000000 default_queue_policy { max_queue_size: 1 } }\n",
    )
    models.write_model(tmp_path / "store", "tiny_queue", 1, models.add_constant(1.0), config)
    path = tmp_path / "tenants.toml"
    keys = tenants(path, ("rate", ["--requests-per-s", "0.01", "--burst", "2"]))
    with running_gateway(tmp_path / "store", tenants=path) as gw:
        stub = gw.stub()
        waiting = stub.ModelInfer.future(
            request("tiny_queue"), metadata=(("x-api-key", keys["rate"]),), timeout=30
        )
        wait_until(lambda: _batcher_pending(gw, "tiny_queue") == 1)
        # Each is admitted by the quota (1 token left), rejected by the full queue, refunded.
        for _ in range(3):
            code, trailers = call(stub, keys["rate"], request("tiny_queue"))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "modelgate-limit" not in trailers
        waiting.cancel()


def _batcher_pending(gw: RunningGateway, model: str) -> int:
    from gateway.batching.batcher import DynamicBatcher

    runtime: object = gw.gateway.manager.version(model, "1").runtime
    while runtime is not None and not isinstance(runtime, DynamicBatcher):
        runtime = getattr(runtime, "inner", None) or getattr(runtime, "_inner", None)
    assert runtime is not None
    return runtime.pending()


def test_two_gateways_sharing_redis_hold_the_combined_rate(
    store: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    limit = 50.0
    path = tmp_path / "tenants.toml"
    keys = tenants(path, ("shared", ["--requests-per-s", str(limit), "--burst", "5"]))
    redis_server.flush()
    args = ["--store", str(store), "--tenants", str(path), "--redis-url", redis_server.url,
            "--metrics-port", "0", "--log-level", "WARNING"]
    with GatewayProcess(args) as first, GatewayProcess(args) as second:
        admitted: Counter[str] = Counter()
        codes: Counter[grpc.StatusCode] = Counter()
        lock = threading.Lock()
        start = time.monotonic() + 1.0  # the first second drains the burst
        window_s = 3.0
        stop = start + window_s + 0.5

        def drive(target: str) -> None:
            with grpc.insecure_channel(target) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                while (sent := time.monotonic()) < stop:
                    code, _ = call(stub, keys["shared"], request())
                    with lock:
                        codes[code] += 1
                        if code == grpc.StatusCode.OK and start <= sent < start + window_s:
                            admitted[target] += 1
                    if code != grpc.StatusCode.OK:
                        time.sleep(0.002)  # a polite client: don't spin on rejections

        threads = [threading.Thread(target=drive, args=(gw.target,))
                   for gw in (first, second, first, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    total = sum(admitted.values())
    expected = limit * window_s
    print(f"two gateways admitted {total} in {window_s}s (limit {expected:.0f}): {admitted}")
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert abs(total - expected) <= 0.1 * expected, (total, expected, admitted)
    # Both replicas served a real share: the limit is shared, not split or one-sided.
    assert min(admitted.values()) > 0.2 * expected, admitted


@pytest.mark.parametrize("mode", ["fail-open", "fail-closed"])
def test_redis_outage_mid_traffic_and_recovery(
    store: Path, tmp_path: Path, redis_server: RedisServer, mode: str
) -> None:
    path = tmp_path / "tenants.toml"
    keys = tenants(path, ("t", ["--requests-per-s", "0.01", "--burst", "4"]))
    redis_server.flush()
    with running_gateway(store, tenants=path, redis_url=redis_server.url,
                         redis_failure_mode=mode) as gw:
        quota = gw.gateway.quota
        assert isinstance(quota, RedisQuotaStore)
        stub = gw.stub()
        statuses = [call(stub, keys["t"], request())[0] for _ in range(6)]
        assert statuses == [grpc.StatusCode.OK] * 4 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
        redis_server.stop()
        statuses = [call(stub, keys["t"], request())[0] for _ in range(6)]
        if mode == "fail-open":
            # Still answering, under this process's own limit (a full local bucket).
            assert statuses == [grpc.StatusCode.OK] * 4 + [
                grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
        else:
            assert statuses == [grpc.StatusCode.UNAVAILABLE] * 6
        assert quota.outages == 1 and not quota.available
        redis_server.start()
        wait_until(lambda: quota.available)
        statuses = [call(stub, keys["t"], request())[0] for _ in range(6)]
        # Shared again, through the restarted (empty) Redis: its bucket, not the local one.
        assert statuses == [grpc.StatusCode.OK] * 4 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
        client = redis.Redis.from_url(redis_server.url)
        assert client.exists("mg:q:t:t:req") == 1
        client.close()


def test_tritonclient_sees_the_quota_rejection(
    store: Path, tmp_path: Path,
) -> None:
    path = tmp_path / "tenants.toml"
    keys = tenants(path, ("t", ["--requests-per-s", "0.01", "--burst", "1"]))
    with running_gateway(store, tenants=path) as gw, tc.InferenceServerClient(gw.target) as c:
        x = tc.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
        headers = {"authorization": f"Bearer {keys['t']}"}
        c.infer("add", [x], headers=headers)
        with pytest.raises(tc.InferenceServerException) as info:
            c.infer("add", [x], headers=headers)
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "requests_per_s" in str(info.value.message())
