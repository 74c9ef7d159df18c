"""Quota stores without a server: the in-process store, the workers' shared-memory store and
the Redis store (a real redis-server) pass the same limit tests; then the Redis store's outage
behaviour."""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.errors import OverloadedError, QuotaExceededError, QuotaUnavailableError
from gateway.quota.redis_store import FAIL_CLOSED, FAIL_OPEN, RedisQuotaStore
from gateway.quota.shared import SharedQuotaStore
from gateway.quota.store import DAY_S, Admission, Limits, LocalQuotaStore, QuotaStore, Scope
from gateway.quota.table import create_table
from tests.support.redis_server import RedisServer
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(60)

WALL0 = 1_900_000_000.0  # a fixed wall clock, 10:13 UTC


class Wall:
    """An injectable wall clock for the day boundary."""

    def __init__(self) -> None:
        self.now = WALL0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["local", "shared", "redis"])
async def store_and_wall(
    request: pytest.FixtureRequest, redis_module: RedisServer, tmp_path: Path
) -> AsyncIterator[tuple[QuotaStore, Wall]]:
    wall = Wall()
    store: QuotaStore
    table = None
    if request.param == "local":
        store = LocalQuotaStore(wall=wall)
    elif request.param == "shared":
        table = create_table(2, folder=tmp_path)
        store = SharedQuotaStore(table.path, 1, wall=wall)
    else:
        redis_module.flush()
        store = RedisQuotaStore(redis_module.url, FAIL_CLOSED, wall=wall)
    await store.start()
    yield store, wall
    await store.close()
    if table is not None:
        table.remove()


def scope(**limits: float) -> tuple[Scope, ...]:
    return (Scope("t:acme", Limits(**limits)),)  # type: ignore[arg-type]


async def rejected(store: QuotaStore, scopes: tuple[Scope, ...], rows: int = 1) -> dict[str, str]:
    with pytest.raises(QuotaExceededError) as info:
        await store.charge(scopes, rows)
    return dict(info.value.trailers)


async def settle(store: QuotaStore) -> None:
    if isinstance(store, RedisQuotaStore):
        await store.drain()


async def test_request_rate_allows_the_burst_then_rejects_with_a_hint(
    store_and_wall: tuple[QuotaStore, Wall],
) -> None:
    store, _ = store_and_wall
    # A slow refill (one token per 100 s): a stalled test machine cannot refill the bucket.
    scopes = scope(requests_per_s=0.01, burst=3)
    for _ in range(3):
        await store.charge(scopes, 1)
    trailers = await rejected(store, scopes)
    assert trailers["modelgate-limit"] == "requests_per_s"
    assert 0 < int(trailers["retry-after-ms"]) <= 100_000


async def test_rows_cost_by_batch_size(store_and_wall: tuple[QuotaStore, Wall]) -> None:
    store, _ = store_and_wall
    scopes = scope(rows_per_s=0.01, rows_burst=64)
    await store.charge(scopes, 60)
    trailers = await rejected(store, scopes, rows=8)
    assert trailers["modelgate-limit"] == "rows_per_s"
    await store.charge(scopes, 4)


async def test_more_rows_than_the_burst_is_refused_without_a_retry_hint(
    store_and_wall: tuple[QuotaStore, Wall],
) -> None:
    store, _ = store_and_wall
    scopes = scope(rows_per_s=1000.0, rows_burst=8)
    with pytest.raises(QuotaExceededError) as info:
        await store.admission(scopes, 9)
    assert dict(info.value.trailers) == {"modelgate-limit": "rows_burst"}
    assert "9 rows" in str(info.value) and "limit of 8 rows" in str(info.value)
    # Nothing was charged: a full burst still passes.
    with await store.admission(scopes, 8):
        pass
    # Without rows_burst the bucket holds one second of rows_per_s.
    with pytest.raises(QuotaExceededError, match=r"limit of 5 rows \(one second of rows_per_s\)"):
        await store.admission(scope(rows_per_s=5.0), 6)


async def test_concurrency_limit_holds_and_frees(store_and_wall: tuple[QuotaStore, Wall]) -> None:
    store, _ = store_and_wall
    scopes = scope(concurrent=2)
    held = [await store.charge(scopes, 1), await store.charge(scopes, 1)]
    trailers = await rejected(store, scopes)
    assert trailers["modelgate-limit"] == "concurrent"
    held.pop().release()
    await settle(store)
    held.append(await store.charge(scopes, 1))
    await rejected(store, scopes)
    for admission in held:
        admission.release()
    await settle(store)


async def test_daily_quota_holds_and_resets_at_midnight_utc(
    store_and_wall: tuple[QuotaStore, Wall],
) -> None:
    store, wall = store_and_wall
    scopes = scope(requests_per_day=3)
    for _ in range(3):
        await store.charge(scopes, 1)
    trailers = await rejected(store, scopes)
    assert trailers["modelgate-limit"] == "requests_per_day"
    to_midnight = DAY_S - WALL0 % DAY_S
    assert int(trailers["retry-after-ms"]) == pytest.approx(to_midnight * 1000, abs=1000)
    wall.now += to_midnight - 1
    await rejected(store, scopes)
    wall.now += 1  # the next UTC day
    for _ in range(3):
        await store.charge(scopes, 1)
    await rejected(store, scopes)


async def test_rejected_before_running_gives_tokens_back(
    store_and_wall: tuple[QuotaStore, Wall],
) -> None:
    store, _ = store_and_wall
    scopes = scope(requests_per_s=0.01, burst=2, requests_per_day=2, concurrent=1)
    for _ in range(5):
        with pytest.raises(OverloadedError):
            async with store.admit(scopes, 1):
                raise OverloadedError("queue full")
        await settle(store)
    async with store.admit(scopes, 1):
        pass
    await settle(store)
    async with store.admit(scopes, 1):
        pass
    await settle(store)
    await rejected(store, scopes)


async def test_a_failed_run_keeps_its_charge(store_and_wall: tuple[QuotaStore, Wall]) -> None:
    store, _ = store_and_wall
    scopes = scope(requests_per_s=0.01, burst=1)
    with pytest.raises(RuntimeError):
        async with store.admit(scopes, 1):
            raise RuntimeError("the model failed while running")
    await rejected(store, scopes)


async def test_all_scopes_or_none(store_and_wall: tuple[QuotaStore, Wall]) -> None:
    store, _ = store_and_wall
    tenant = Scope("t:acme", Limits(requests_per_s=1, burst=2))
    model = Scope("m:acme:iris", Limits(requests_per_s=1, burst=1), "model=iris")
    await store.charge((tenant, model), 1)
    trailers = await rejected(store, (tenant, model))
    assert trailers["modelgate-limit"] == "requests_per_s;model=iris"
    await store.charge((tenant,), 1)  # the rejected request took nothing from the tenant


async def test_two_redis_stores_share_one_bucket(redis_module: RedisServer) -> None:
    redis_module.flush()
    stores = [RedisQuotaStore(redis_module.url) for _ in range(2)]
    scopes = scope(requests_per_s=0.01, burst=20)
    admitted = 0
    for _ in range(20):
        for store in stores:
            try:
                await store.charge(scopes, 1)
                admitted += 1
            except QuotaExceededError:
                pass
    assert admitted == 20
    for store in stores:
        await store.close()


def _paused(server: RedisServer) -> None:
    server.stop()
    with socket.socket() as probe:  # the port is really closed
        assert probe.connect_ex(("127.0.0.1", server.port)) != 0


async def test_fail_open_serves_under_local_limits_and_resumes_shared(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisQuotaStore(redis_server.url, FAIL_OPEN, reconnect_s=0.05)
    await store.start()
    scopes = scope(requests_per_s=0.01, burst=3)
    for _ in range(3):
        await store.charge(scopes, 1)
    await rejected(store, scopes)
    _paused(redis_server)
    caplog.set_level(logging.WARNING, logger="gateway.quota.redis_store")
    # The local fallback has its own full bucket: this process's share, not zero.
    admitted: list[Admission] = []
    for _ in range(10):
        with contextlib.suppress(QuotaExceededError):
            admitted.append(await store.charge(scopes, 1))
    assert len(admitted) == 3
    assert not store.available and store.outages == 1
    assert sum("unreachable" in r.message for r in caplog.records) == 1
    redis_server.start()
    await until(lambda: store.available, "Redis shared again")
    assert sum("shared again" in r.message for r in caplog.records) == 1
    # Shared again: a fresh Redis has a full bucket (the restart lost the counters).
    for _ in range(3):
        await store.charge(scopes, 1)
    await rejected(store, scopes)
    assert store.outages == 1
    await store.close()


async def test_fail_closed_answers_unavailable_until_redis_is_back(
    redis_server: RedisServer,
) -> None:
    store = RedisQuotaStore(redis_server.url, FAIL_CLOSED, reconnect_s=0.05)
    await store.start()
    # A slow rate leases one token at a time, so every charge asks Redis.
    scopes = scope(requests_per_s=0.01, burst=100)
    await store.charge(scopes, 1)
    _paused(redis_server)
    for _ in range(3):
        with pytest.raises(QuotaUnavailableError) as info:
            await store.charge(scopes, 1)
        assert info.value.trailers["modelgate-limit"] == "quota_store"
    redis_server.start()
    await until(lambda: store.available, "Redis shared again")
    await store.charge(scopes, 1)
    await store.close()


async def test_redis_down_at_start_fails_over_and_recovers(redis_server: RedisServer) -> None:
    redis_server.stop()
    store = RedisQuotaStore(redis_server.url, FAIL_OPEN, reconnect_s=0.05)
    await store.start()
    assert not store.available
    await store.charge(scope(requests_per_s=5), 1)
    redis_server.start()
    await until(lambda: store.available, "Redis shared again")
    await store.close()


async def test_redis_over_a_unix_socket() -> None:
    server = RedisServer(unix_socket=True)
    server.start()
    try:
        store = RedisQuotaStore(server.url, FAIL_CLOSED)
        await store.start()
        assert store.available
        scopes = scope(requests_per_s=0.01, burst=2)
        await store.charge(scopes, 1)
        await store.charge(scopes, 1)
        await rejected(store, scopes)
        await store.close()
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)
