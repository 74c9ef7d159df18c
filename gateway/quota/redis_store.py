"""The shared quota store in Redis: one Lua script updates buckets, daily counts and in-flight
holdings atomically; tokens and slots are leased in blocks so most requests never wait on it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.errors import LIMIT_KEY, RETRY_AFTER_KEY, QuotaUnavailableError
from gateway.quota.leases import (
    LEASE_SCRIPT,
    RETURN_SCRIPT,
    Lease,
    Op,
    SlotLeases,
    SlotPool,
    block_size,
    token_op,
)
from gateway.quota.rules import RULES, SLOT_RETRY_MS, AnyRule, On, exceeded
from gateway.quota.shared import SharedQuotaStore
from gateway.quota.store import (
    Admission,
    Clock,
    LocalQuotaStore,
    QuotaStore,
    Scope,
)
from gateway.quota.table import QuotaTableError

log = logging.getLogger(__name__)

FAIL_OPEN: Final = "fail-open"
FAIL_CLOSED: Final = "fail-closed"


@dataclass(slots=True)
class _SharedAdmission(Admission):
    store: RedisQuotaStore
    spent: list[tuple[str, float]] = field(default_factory=list)
    pools: list[SlotPool] = field(default_factory=list)

    def refund(self) -> None:
        spent, self.spent = self.spent, []
        for lease_key, amount in spent:
            lease = self.store.leases.get(lease_key)
            if lease is not None:
                lease.tokens += amount

    def release(self) -> None:
        pools, self.pools = self.pools, []
        for pool in pools:
            pool.put()  # the slot stays held by this process; the keeper gives spares back


class _Down(Exception):
    """Redis went down while a charge waited for a pool: serve it as in an outage."""


class _Stale(Exception):
    """The pools a charge waited for were given up in an outage that is over."""


class RedisQuotaStore(QuotaStore):
    """Limits shared by every worker and replica through one Redis. When Redis cannot be
    reached the store fails open (a LocalQuotaStore per process) or closed (UNAVAILABLE),
    logs the outage once, probes until Redis answers, then shares limits again."""

    def __init__(
        self,
        url: str,
        failure_mode: str = FAIL_OPEN,
        *,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
        lease_s: float = 0.05,
        lease_ttl_s: float = 0.5,
        reconnect_s: float = 0.5,
        hold_s: float = 60.0,
        give_back_s: float = 0.025,
        timeout_s: float = 0.25,
        prefix: str = "mg:q:",
        on_outage: Callable[[], None] | None = None,
    ) -> None:
        if failure_mode not in (FAIL_OPEN, FAIL_CLOSED):
            raise ValueError(f"failure mode must be {FAIL_OPEN} or {FAIL_CLOSED}")
        self.url = url
        self.failure_mode = failure_mode
        self.clock = clock
        self.wall = wall
        self.lease_s = lease_s
        self.lease_ttl_s = lease_ttl_s
        self.reconnect_s = reconnect_s
        self.prefix = prefix
        self.local = LocalQuotaStore(clock, wall)
        self.leases: dict[str, Lease] = {}
        self.available = True
        self.outages = 0
        self.failed_probes = 0  # pings of an unreachable Redis that got no answer
        self._on_outage = on_outage
        self._down_since = 0.0
        # Fail fast: a dead Redis must cost a request a quarter second at most, once.
        self._client = aioredis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0), health_check_interval=0,
        )
        self._lease = self._client.register_script(LEASE_SCRIPT)
        self._return = self._client.register_script(RETURN_SCRIPT)
        self.slots = SlotLeases(self._client, prefix=prefix, hold_s=hold_s,
                                give_back_s=give_back_s, clock=time.monotonic,
                                available=lambda: self.available, on_error=self._mark_down)
        self._probe: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._closed = False

    async def start(self) -> None:
        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            self._mark_down(exc)

    async def close(self) -> None:
        await self.drain()
        self._closed = True
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self.slots.close()
        if self.available:
            with contextlib.suppress(RedisError, OSError):
                await self._return_period_leases()
        await self._client.aclose()

    async def drain(self) -> None:
        """Wait for the charges still talking to Redis after their caller went away."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def held_slots(self, scope_key: str | None = None, rule: str = "concurrent") -> int:
        """Slots this process holds in Redis now, of one rule in one scope, or all."""
        return self.slots.held(scope_key, rule)

    def charge_at_once(self, scopes: Sequence[Scope], rows: int, on: On = On.REQUEST
                       ) -> Admission | None:
        # The common case: leased tokens and a spare held slot cover the request.
        if not self.available:
            return None
        now = self.clock()
        wall = self.wall()
        ops = self._token_ops(scopes, rows, wall, on)
        if not all(self._covered(op, now) for op in ops):
            return None
        pools: list[SlotPool] = []
        for pool in self._pools(scopes, on):
            if not pool.take():
                for taken in pools:
                    taken.put()
                return None
            pools.append(pool)
        return self._admitted(ops, pools)

    async def charge(self, scopes: Sequence[Scope], rows: int, on: On = On.REQUEST
                     ) -> Admission:
        if self.available:
            try:
                return await self._charge_shared(scopes, rows, on)
            except (RedisError, OSError) as exc:
                self._mark_down(exc)
            except _Down:
                pass
        if self.failure_mode == FAIL_CLOSED:
            raise QuotaUnavailableError(
                "quota store unavailable; retry shortly",
                trailers={RETRY_AFTER_KEY: str(math.ceil(self.reconnect_s * 1000)),
                          LIMIT_KEY: "quota_store"},
            )
        return self.local.charge_now(scopes, rows, on)

    async def _charge_shared(self, scopes: Sequence[Scope], rows: int, on: On) -> Admission:
        # Shielded: once a request is sent, its grants are applied (and, should the caller
        # have gone away, given back) whatever happens to the caller, so what this process
        # holds and what Redis records for it stay in step.
        task = asyncio.get_running_loop().create_task(self._charge_slow(scopes, rows, on))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            task.add_done_callback(self._undo)
            raise

    def _undo(self, task: asyncio.Task[Admission]) -> None:
        # The caller went away while Redis answered: what the charge took goes back.
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            admission = task.result()
            admission.refund()
            admission.release()
        elif isinstance(exc, RedisError | OSError):
            self._mark_down(exc)

    async def _charge_slow(self, scopes: Sequence[Scope], rows: int, on: On) -> Admission:
        try:
            return await self._charge_pools(scopes, rows, on)
        except _Stale:  # Redis was down and is back while this waited: its fresh pools
            try:
                return await self._charge_pools(scopes, rows, on)
            except _Stale:
                raise _Down from None

    async def _charge_pools(self, scopes: Sequence[Scope], rows: int, on: On) -> Admission:
        pools = self._pools(scopes, on)
        taken = [pool for pool in pools if pool.take()]
        need = [pool for pool in pools if pool not in taken]
        locked: list[SlotPool] = []
        try:
            # One fetch at a time per pool: the requests that wait take the spares the
            # first one's block brings, and Redis sees each holding's writes in order.
            for pool in sorted(need, key=lambda p: p.key):
                await pool.lock.acquire()
                locked.append(pool)
                if pool.take():  # a slot was freed, or granted, while this one waited
                    taken.append(pool)
                    need.remove(pool)
            if any(pool.orphaned_at is not None for pool in pools):
                raise _Stale if self.available else _Down
            now = self.clock()
            wall = self.wall()
            ops = self._token_ops(scopes, rows, wall, on)
            short = [op for op in ops if not self._covered(op, now)]
            if short or need:
                argv: list[str | float] = []
                for op in short:
                    argv.extend(op.args)
                for pool in need:
                    argv.extend(("c", pool.limit, pool.owner, block_size(pool.limit),
                                 pool.held))
                argv.append(self.slots.hold_ms)
                keys = [op.redis_key for op in short] + [pool.key for pool in need]
                result = [int(v) for v in await self._lease(keys=keys, args=argv)]
                self._apply(short, need, taken, result, now=now, wall=wall)
            return self._admitted(ops, pools)
        except BaseException:
            for pool in taken:
                pool.put()
            raise
        finally:
            for pool in locked:
                pool.lock.release()

    def _admitted(self, ops: Sequence[Op], pools: list[SlotPool]) -> _SharedAdmission:
        admission = _SharedAdmission(self, pools=pools)
        for op in ops:
            self.leases[op.lease_key].tokens -= op.need
            admission.spent.append((op.lease_key, op.need))
        return admission

    def _token_ops(self, scopes: Sequence[Scope], rows: int, wall: float, on: On
                   ) -> list[Op]:
        ops = []
        for scope in scopes:
            for rule in RULES.on(on):
                op = token_op(rule, scope, rule.cost(rows), wall, lease_s=self.lease_s,
                              prefix=self.prefix)
                if op is not None:
                    ops.append(op)
        return ops

    def _pools(self, scopes: Sequence[Scope], on: On) -> list[SlotPool]:
        """The slot pools a charge for ``on`` takes one slot of (its slot rules that are
        set, in each scope)."""
        rules: tuple[AnyRule, ...] = tuple(r for r in RULES.on(on) if r.counters)
        return [self.slots.pool(scope, rule) for scope in scopes for rule in rules
                if scope.limits.get(rule.name) is not None]

    def _covered(self, op: Op, now: float) -> bool:
        lease = self.leases.get(op.lease_key)
        if lease is None:
            return False
        if now >= lease.expires and lease.lapses:
            lease.tokens = 0.0  # an old rate lease would let a replica run ahead
        return lease.tokens >= op.need

    def _apply(self, ops: Sequence[Op], need: Sequence[SlotPool], taken: list[SlotPool],
               result: Sequence[int], *, now: float, wall: float) -> None:
        denial: tuple[str, Scope, float] | None = None
        for i, op in enumerate(ops):
            grant, wait_ms = result[2 * i], result[2 * i + 1]
            lease = self.leases.get(op.lease_key)
            if lease is None:
                lease = self.leases[op.lease_key] = Lease(lapses=op.lapses)
            if grant > 0:
                lease.tokens += grant
                lease.expires = now + self.lease_ttl_s
            elif denial is None:
                denial = (op.rule.name, op.scope, op.retry_after(wall, wait_ms))
        for i, pool in enumerate(need, len(ops)):
            if result[2 * i] > 0:
                self.slots.granted(pool, result[2 * i], self.slots.clock())
            if pool.take():  # granted now, or freed here while Redis answered
                taken.append(pool)
            elif denial is None:  # a token denial, if any, is the one to report
                denial = (pool.rule.name, pool.scope, SLOT_RETRY_MS / 1000)
        if denial is not None:
            # Tokens and slots granted to other ops stay leased for the next request.
            raise exceeded(*denial)

    async def _return_period_leases(self) -> None:
        for lease_key, lease in self.leases.items():
            if not lease.lapses and lease.tokens >= 1:
                await self._return(keys=[self.prefix + lease_key], args=[int(lease.tokens)])

    def _mark_down(self, exc: BaseException) -> None:
        if not self.available or self._closed:
            return
        self.available = False
        self.outages += 1
        if self._on_outage is not None:
            self._on_outage()
        self._down_since = time.monotonic()
        self.leases.clear()
        self.slots.orphan_all()
        mode = ("serving under per-process limits" if self.failure_mode == FAIL_OPEN
                else "answering UNAVAILABLE")
        log.warning("quota store Redis %s unreachable (%s): %s until it is back",
                    _redacted(self.url), exc, mode)
        self._probe = asyncio.get_running_loop().create_task(self._reconnect(), name="redis")

    async def _reconnect(self) -> None:
        while True:
            await asyncio.sleep(self.reconnect_s)
            try:
                await self._client.ping()
            except (RedisError, OSError):
                self.failed_probes += 1
                continue
            self.available = True
            log.warning("quota store Redis %s is back after %.1fs: limits shared again",
                        _redacted(self.url), time.monotonic() - self._down_since)
            return


def _redacted(url: str) -> str:
    # Never log a password that may be in the URL.
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else url


def build_quota_store(
    redis_url: str,
    failure_mode: str,
    on_outage: Callable[[], None] | None = None,
    *,
    table: Path | None = None,
    worker_index: int | None = None,
) -> QuotaStore:
    """The store the settings ask for: shared through Redis by every process; else shared
    through the supervisor's table by its workers; else in this process alone."""
    if redis_url:
        return RedisQuotaStore(redis_url, failure_mode, on_outage=on_outage)
    if table is not None and worker_index is not None:
        try:
            return SharedQuotaStore(table, worker_index)
        except QuotaTableError as exc:
            # Still limited, only not across workers: loud, but no reason to stop serving.
            log.error("%s; this worker enforces the limits by itself", exc)
    return LocalQuotaStore()
