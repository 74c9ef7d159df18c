"""In-flight slots leased from a real redis-server in blocks: two stores (two replicas) never
exceed a shared concurrency limit together, spares go back, a crashed holder's slots return
after the hold time, closing returns them at once, and outages leave no slot behind."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway.errors import QuotaExceededError
from gateway.quota.leases import BLOCK_MAX, block_size
from gateway.quota.redis_store import FAIL_OPEN, RedisQuotaStore
from gateway.quota.store import Admission, Limits, Scope
from tests.support.redis_server import RedisServer
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[3]
SLOTS_KEY = "mg:q:t:acme:slots"


@pytest.fixture
async def stores(redis_module: RedisServer) -> AsyncIterator[Callable[..., RedisQuotaStore]]:
    """Makes stores (replicas) on one Redis, flushed first; closes them afterwards."""
    redis_module.flush()
    made: list[RedisQuotaStore] = []

    def make(**options: float) -> RedisQuotaStore:
        store = RedisQuotaStore(redis_module.url, **options)  # type: ignore[arg-type]
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


def limited(concurrent: int) -> tuple[Scope, ...]:
    return (Scope("t:acme", Limits(concurrent=concurrent)),)


async def take(store: RedisQuotaStore, scopes: tuple[Scope, ...], count: int) -> list[Admission]:
    """``count`` admissions at once, or none (what was taken goes back) and the error."""
    held: list[Admission] = []
    try:
        for _ in range(count):
            held.append(await store.charge(scopes, 1))
    except QuotaExceededError:
        for admission in held:
            admission.release()
        raise
    return held


async def until_taken(store: RedisQuotaStore, scopes: tuple[Scope, ...], count: int,
                      ) -> list[Admission]:
    """Take ``count`` slots as soon as they are there."""
    taken: list[Admission] = []

    async def took() -> bool:
        try:
            taken[:] = await take(store, scopes, count)
        except QuotaExceededError:
            return False
        return True

    await until(took, f"{count} slots taken", interval=0.02)
    return taken


async def holdings(url: str) -> dict[str, int]:
    """The scope's holdings in Redis: owner -> slots."""
    client = aioredis.from_url(url, decode_responses=True)
    try:
        fields = await client.hgetall(SLOTS_KEY)
    finally:
        await client.aclose()
    return {str(owner): int(str(value).split(":")[0]) for owner, value in fields.items()}


def test_block_size_is_a_few_slots_and_a_fraction_of_the_limit() -> None:
    assert [block_size(n) for n in (1, 2, 3, 7)] == [1, 1, 1, 1]
    assert block_size(8) == 2 and block_size(20) == 5
    assert all(block_size(n) <= max(1, n // 4) for n in range(1, 200))
    assert block_size(10**6) == BLOCK_MAX


async def test_two_stores_never_exceed_a_shared_concurrency_limit(
    stores: Callable[..., RedisQuotaStore],
) -> None:
    limit = 12
    first, second = stores(), stores()
    scopes = limited(limit)
    in_flight = most = 0
    admitted = {id(first): 0, id(second): 0}
    rng = random.Random(7)
    loop = asyncio.get_running_loop()
    stop = loop.time() + 20  # a bound, not a measurement: the loop ends at 3000 admissions

    async def hammer(store: RedisQuotaStore) -> None:
        nonlocal in_flight, most
        while sum(admitted.values()) < 3000 and loop.time() < stop:
            try:
                async with store.admit(scopes, 1):
                    in_flight += 1
                    most = max(most, in_flight)
                    admitted[id(store)] += 1
                    await asyncio.sleep(rng.random() * 0.002)
                    in_flight -= 1
            except QuotaExceededError:
                await asyncio.sleep(rng.random() * 0.001)

    await asyncio.gather(*(hammer(store) for store in (first, second) for _ in range(20)))
    assert most == limit, most  # reached, never passed
    assert min(admitted.values()) > 0, admitted  # both replicas took part
    assert sum((await holdings(first.url)).values()) <= limit


async def test_spare_slots_go_back_for_the_other_store(
    redis_module: RedisServer, stores: Callable[..., RedisQuotaStore],
) -> None:
    first, second = stores(), stores()
    scopes = limited(4)
    held = await take(first, scopes, 4)
    with pytest.raises(QuotaExceededError) as info:
        await second.charge(scopes, 1)
    assert info.value.trailers["modelgate-limit"] == "concurrent"
    assert int(info.value.trailers["retry-after-ms"]) > 0
    assert str(info.value).startswith("quota exceeded: concurrent; retry in ")
    for admission in held:
        admission.release()
    # Nobody asks for them back: the first store notices they stay unused and returns them.
    await until(lambda: first.held_slots() == 0)
    other = await take(second, scopes, 4)
    assert second.held_slots() == 4
    for admission in other:
        admission.release()
    await until(lambda: second.held_slots() == 0)
    assert await holdings(redis_module.url) == {}


async def test_a_busy_store_keeps_its_slots_and_uses_them_without_redis(
    stores: Callable[..., RedisQuotaStore],
) -> None:
    store = stores(give_back_s=60.0)  # no give-back during the test
    scopes = limited(100)
    held = await take(store, scopes, 3)  # one block (8 slots) serves all three
    assert store.held_slots() == block_size(100)
    for admission in held:
        admission.release()
    # Spare held slots admit at once, without a Redis round trip.
    again = [store.charge_at_once(scopes, 1) for _ in range(block_size(100))]
    assert all(again)
    assert store.charge_at_once(scopes, 1) is None  # all in use: this one asks Redis
    more = await store.charge(scopes, 1)
    assert store.held_slots() == 2 * block_size(100)
    for each in [*again, more]:
        assert each is not None
        each.release()
        each.release()  # exactly once: a second release frees nothing
    assert store.slots.pools["t:acme", "concurrent"].in_use == 0


async def test_a_held_slot_stays_held_past_the_hold_time(
    redis_module: RedisServer, stores: Callable[..., RedisQuotaStore],
) -> None:
    first, second = stores(hold_s=1.5), stores(hold_s=1.5)
    scopes = limited(2)
    held = await take(first, scopes, 2)
    client = aioredis.from_url(redis_module.url, decode_responses=True)
    try:
        holding = await client.hget(SLOTS_KEY, first.slots.pools["t:acme", "concurrent"].owner)
        granted_until = int(str(holding).split(":")[1])

        async def redis_ms() -> int:
            seconds, micros = await client.time()
            return int(seconds) * 1000 + int(micros) // 1000

        async def expired() -> bool:
            now_ms = await redis_ms()
            assert now_ms > granted_until - 10_000
            return now_ms > granted_until + 50

        # Wait on Redis's own clock until the first grant's expiry has passed.
        await until(expired, "the first grant's expiry on Redis's clock", interval=0.05)
    finally:
        await client.aclose()
    with pytest.raises(QuotaExceededError):  # the heartbeat kept the holding
        await second.charge(scopes, 1)
    for admission in held:
        admission.release()


CRASHING_HOLDER = """
import asyncio, sys
from gateway.quota.store import Limits, Scope
from gateway.quota.redis_store import RedisQuotaStore

async def main() -> None:
    store = RedisQuotaStore(sys.argv[1], hold_s=float(sys.argv[2]), give_back_s=60.0)
    await store.start()
    scopes = (Scope("t:acme", Limits(concurrent=int(sys.argv[3]))),)
    held = [await store.charge(scopes, 1) for _ in range(int(sys.argv[3]))]
    print("held", len(held), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_crashed_holders_slots_come_back_after_the_hold_time(
    redis_module: RedisServer, stores: Callable[..., RedisQuotaStore],
) -> None:
    scopes = limited(3)
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING_HOLDER, redis_module.url, "3", "3",
        cwd=ROOT, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert holder.stdout is not None
        line = await asyncio.wait_for(holder.stdout.readline(), 30)
        assert line.split() == [b"held", b"3"], line
    finally:
        holder.kill()  # SIGKILL: no close, no give-back, no more heartbeats: a crash
        await holder.wait()
    store = stores()
    with pytest.raises(QuotaExceededError):  # the dead holder's slots are still counted
        await store.charge(scopes, 1)
    held = await until_taken(store, scopes, 3)  # ... until its hold (3 s) ran out
    for admission in held:
        admission.release()


async def test_closing_gives_the_slots_back_at_once(
    redis_module: RedisServer, stores: Callable[..., RedisQuotaStore],
) -> None:
    first, second = stores(give_back_s=60.0), stores()
    scopes = limited(4)
    await take(first, scopes, 4)  # still in flight when the store closes
    with pytest.raises(QuotaExceededError):
        await second.charge(scopes, 1)
    await first.close()
    assert len(await holdings(redis_module.url)) == 0
    held = await take(second, scopes, 4)  # at once, no waiting
    for admission in held:
        admission.release()


async def test_a_caller_that_goes_away_mid_grant_takes_no_slot(
    stores: Callable[..., RedisQuotaStore],
) -> None:
    store = stores(give_back_s=60.0)
    scopes = limited(2)
    for _ in range(5):
        charge = asyncio.ensure_future(store.charge(scopes, 1))
        await asyncio.sleep(0)  # the charge is on its way to Redis
        charge.cancel()
        with pytest.raises(asyncio.CancelledError):
            await charge
        await store.drain()
    held = await take(store, scopes, 2)  # both slots free: the cancelled ones gave theirs back
    with pytest.raises(QuotaExceededError):
        await store.charge(scopes, 1)
    for admission in held:
        admission.release()


async def test_slots_held_through_an_outage_go_back_once_drained(
    redis_server: RedisServer,
) -> None:
    server = redis_server
    first = RedisQuotaStore(server.url, FAIL_OPEN, reconnect_s=0.05)
    second = RedisQuotaStore(server.url, FAIL_OPEN)
    scopes = limited(2)
    try:
        held = await take(first, scopes, 2)
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)  # accepts connections, never answers
        try:
            # No spare slot: the request asks Redis, times out, and is served locally.
            held.append(await first.charge(scopes, 1))
            assert not first.available and first.outages == 1
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        await until(lambda: first.available)
        with pytest.raises(QuotaExceededError):  # the old holding still counts
            await second.charge(scopes, 1)
        for admission in held:
            admission.release()
        # Drained: the old holding is dropped long before its hold time (60 s).
        taken = await until_taken(second, scopes, 2)
        for admission in taken:
            admission.release()
    finally:
        await first.close()
        await second.close()
