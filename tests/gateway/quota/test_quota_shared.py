"""The workers' shared-memory quota store: real spawned processes charging one table, a
worker killed while holding a slot lock, a restarted worker index, a full table, changed
limits, stale and damaged table files. (The limit-for-limit tests are in test_quota.py.)"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import QuotaExceededError
from gateway.quota.redis_store import build_quota_store
from gateway.quota.shared import SharedQuotaStore
from gateway.quota.store import Limits, LocalQuotaStore, Scope
from gateway.quota.table import HEADER, MAGIC, PREFIX, QuotaTableError, create_table, slot_bytes

pytestmark = pytest.mark.timeout(120)

SLOW = 0.001  # one token per 1000 s: nothing refills while a test runs
# What each process charges, scope by scope, again and again; every limit is 1000.
HAMMERED = {
    "rate": (Scope("t:rate", Limits(requests_per_s=SLOW, burst=1000)),),
    "rows": (Scope("t:rows", Limits(rows_per_s=SLOW, rows_burst=2000)),),  # 2 rows a request
    "slots": (Scope("t:slots", Limits(concurrent=1000)),),  # admissions are never released
    "daily": (Scope("t:daily", Limits(requests_per_day=1000)),),
    # Tenant and model scope: all or nothing across processes; the model's 1000 binds.
    "pair": (Scope("t:pair", Limits(requests_per_s=SLOW, burst=1500)),
             Scope("m:pair:iris", Limits(requests_per_s=SLOW, burst=1000), "model=iris")),
}


def _hammer(path: str, index: int, go: Any, out: Any) -> None:
    """One worker: charge every case 2000 times, interleaved, and report what passed."""
    store = SharedQuotaStore(Path(path), index)
    asyncio.run(store.start())
    go.wait(60)
    admitted = dict.fromkeys(HAMMERED, 0)
    held = []
    for _ in range(2000):
        for name, scopes in HAMMERED.items():
            try:
                held.append(store.charge_now(scopes, 2 if name == "rows" else 1))
            except QuotaExceededError:
                continue
            admitted[name] += 1
    out.put((index, admitted))


def test_two_processes_hammering_one_table_admit_exactly_the_limits(tmp_path: Path) -> None:
    table = create_table(2, folder=tmp_path)
    context = multiprocessing.get_context("spawn")
    go, out = context.Event(), context.Queue()
    workers = [context.Process(target=_hammer, args=(str(table.path), i, go, out))
               for i in range(2)]
    try:
        for worker in workers:
            worker.start()
        go.set()
        results = dict(out.get(timeout=90) for _ in workers)
        for worker in workers:
            worker.join(30)
        totals = {name: results[0][name] + results[1][name] for name in HAMMERED}
        print("admitted per process:", results)
        # Per-process buckets would admit up to 2000 of each.
        assert totals == dict.fromkeys(HAMMERED, 1000)
        store = SharedQuotaStore(table.path, 0)
        assert store.in_flight("t:slots") == 1000
        # The pair's rejected requests took nothing from the tenant: 500 of its 1500 remain.
        tenant = HAMMERED["pair"][:1]
        for _ in range(500):
            store.charge_now(tenant, 1)
        with pytest.raises(QuotaExceededError):
            store.charge_now(tenant, 1)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
        table.remove()


KEY = "t:few"
FEW = (Scope(KEY, Limits(concurrent=3)),)


def _hold_then_hang(path: str, ready: Any) -> None:
    """A worker that holds two in-flight slots and then dies inside a charge, lock held."""
    store = SharedQuotaStore(Path(path), 0)
    asyncio.run(store.start())
    store.charge_now(FEW, 1)
    store.charge_now(FEW, 1)
    slot = store._slot(KEY)
    assert slot is not None
    store.table.lock(slot.offset)
    ready.set()
    signal.pause()


async def test_a_killed_worker_holds_no_lock_and_its_restart_frees_its_slots(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    table = create_table(2, folder=tmp_path)
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    dying = context.Process(target=_hold_then_hang, args=(str(table.path), ready))
    dying.start()
    try:
        assert ready.wait(60)
        assert dying.pid is not None
        os.kill(dying.pid, signal.SIGKILL)
        dying.join(30)
        other = SharedQuotaStore(table.path, 1)
        await other.start()
        # The kernel dropped the dead worker's lock: this does not block.
        assert other.in_flight(KEY) == 2
        mine = other.charge_now(FEW, 1)
        with pytest.raises(QuotaExceededError) as info:
            other.charge_now(FEW, 1)
        assert info.value.trailers["modelgate-limit"] == "concurrent"
        # Worker 0 restarts: its column is zeroed, the dead worker's two slots come back.
        caplog.set_level(logging.WARNING, logger="gateway.quota.shared")
        restarted = SharedQuotaStore(table.path, 0)
        await restarted.start()
        assert "freed 2 in-flight quota slots" in caplog.text
        assert other.in_flight(KEY) == 1
        held = [restarted.charge_now(FEW, 1), other.charge_now(FEW, 1)]
        with pytest.raises(QuotaExceededError):
            restarted.charge_now(FEW, 1)
        # Released exactly once, whoever admitted it.
        for admission in [*held, mine, mine]:
            admission.release()
        assert other.in_flight(KEY) == 0
        await restarted.close()
        await other.close()
    finally:
        if dying.is_alive():
            dying.kill()
        table.remove()


async def test_a_full_table_limits_new_scopes_per_worker_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="gateway.quota.shared")
    table = create_table(1, slots=2, folder=tmp_path)
    store = SharedQuotaStore(table.path, 0)
    await store.start()
    one = Limits(requests_per_s=SLOW, burst=1)
    for key in ("t:a", "t:b", "t:c", "t:d"):
        store.charge_now((Scope(key, one),), 1)
        with pytest.raises(QuotaExceededError):  # still limited, shared or not
            store.charge_now((Scope(key, one),), 1)
    assert caplog.text.count("the shared quota table is full") == 1
    assert "'t:c'" in caplog.text
    # A request with a shared scope and one that did not fit: still all or nothing.
    tenant = Scope("t:e", Limits(requests_per_s=SLOW, burst=2))
    tenant_table = create_table(1, slots=1, folder=tmp_path)
    mixed = SharedQuotaStore(tenant_table.path, 0)
    model = Scope("m:e:iris", Limits(requests_per_s=SLOW, burst=1), "model=iris")
    mixed.charge_now((tenant, model), 1)
    with pytest.raises(QuotaExceededError) as info:
        mixed.charge_now((tenant, model), 1)
    assert info.value.trailers["modelgate-limit"] == "requests_per_s;model=iris"
    mixed.charge_now((tenant,), 1)  # the rejected request took nothing from the tenant
    with pytest.raises(QuotaExceededError):
        mixed.charge_now((tenant,), 1)
    for opened in (store, mixed):
        await opened.close()
    table.remove()
    tenant_table.remove()


async def test_changed_limits_give_fresh_buckets_once_not_once_per_worker(
    tmp_path: Path,
) -> None:
    table = create_table(2, folder=tmp_path)
    first, second = SharedQuotaStore(table.path, 0), SharedQuotaStore(table.path, 1)
    old = Limits(requests_per_s=SLOW, burst=2, concurrent=5)
    new = Limits(requests_per_s=SLOW, burst=3, concurrent=5)
    held = [first.charge_now((Scope(KEY, old),), 1), second.charge_now((Scope(KEY, old),), 1)]
    with pytest.raises(QuotaExceededError):
        first.charge_now((Scope(KEY, old),), 1)
    # The first worker to reload starts a fresh bucket of the new size...
    for _ in range(3):
        held.append(first.charge_now((Scope(KEY, new),), 1))
    with pytest.raises(QuotaExceededError):
        first.charge_now((Scope(KEY, new),), 1)
    # ...and a worker that has not reloaded yet charges the same bucket, not a refilled one.
    with pytest.raises(QuotaExceededError):
        second.charge_now((Scope(KEY, old),), 1)
    # When it reloads, the table already carries the new limits: no second refill.
    with pytest.raises(QuotaExceededError):
        second.charge_now((Scope(KEY, new),), 1)
    # The in-flight counts survived the change, as in LocalQuotaStore.
    assert first.in_flight(KEY) == 5
    with pytest.raises(QuotaExceededError) as info:
        second.charge_now((Scope(KEY, Limits(concurrent=5)),), 1)
    assert info.value.trailers["modelgate-limit"] == "concurrent"
    for admission in held:
        admission.release()
    assert second.in_flight(KEY) == 0
    await first.close()
    await second.close()
    table.remove()


def test_a_new_table_sweeps_stale_ones_and_keeps_live_ones(tmp_path: Path) -> None:
    live = create_table(2, folder=tmp_path)
    crashed = create_table(2, folder=tmp_path)
    os.close(crashed._fd)  # its supervisor died: nobody holds the file any more
    opened = SharedQuotaStore(live.path, 0)
    live.remove()  # the live table's supervisor stopped, but a worker still has it open
    still = create_table(2, folder=tmp_path)
    try:
        assert not crashed.path.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == [still.path.name]
        assert still.path.name.startswith(PREFIX) and still.path != crashed.path
        opened.charge_now(FEW, 1)  # an unlinked table still works for whoever maps it
    finally:
        asyncio.run(opened.close())
        still.remove()
    assert not still.path.exists()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_a_table_that_does_not_add_up_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = create_table(2, slots=8, folder=tmp_path)
    size = good.path.stat().st_size
    header = HEADER.pack(MAGIC, 8, 2, slot_bytes(2))
    bad = {
        "short": _write(tmp_path / "short", b"MGQ"),
        "magic": _write(tmp_path / "magic", b"x" * size),
        "slots beyond the file": _write(
            tmp_path / "big", HEADER.pack(MAGIC, 9, 2, slot_bytes(2)).ljust(size, b"\0")),
        "columns out of range": _write(
            tmp_path / "cols", HEADER.pack(MAGIC, 8, 0, slot_bytes(0)).ljust(size, b"\0")),
        "truncated": _write(tmp_path / "cut", header.ljust(size - 8, b"\0")),
    }
    for what, path in bad.items():
        with pytest.raises(QuotaTableError):
            SharedQuotaStore(path, 0)
        print("refused:", what)
    with pytest.raises(QuotaTableError, match="no column"):
        SharedQuotaStore(good.path, 2)
    # The server falls back to per-worker limits, loudly.
    caplog.set_level(logging.ERROR, logger="gateway.quota.redis_store")
    assert isinstance(build_quota_store("", "fail-open", table=bad["magic"], worker_index=0),
                      LocalQuotaStore)
    assert "bad magic" in caplog.text
    shared = build_quota_store("", "fail-open", table=good.path, worker_index=1)
    assert isinstance(shared, SharedQuotaStore)
    asyncio.run(shared.close())
    assert isinstance(build_quota_store("", "fail-open"), LocalQuotaStore)
    good.remove()
