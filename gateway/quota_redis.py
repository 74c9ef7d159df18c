"""The shared quota store in Redis: one Lua script updates buckets, daily counts and in-flight
sets atomically; tokens are leased in small blocks so most requests never wait on Redis."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.errors import LIMIT_KEY, RETRY_AFTER_KEY, QuotaUnavailableError
from gateway.quota import (
    CONCURRENCY_RETRY_MS,
    DAY_S,
    Admission,
    Clock,
    LocalQuotaStore,
    QuotaStore,
    Scope,
    exceeded,
    seconds_to_next_day,
)
from gateway.quota_shared import SharedQuotaStore
from gateway.quota_table import QuotaTableError

log = logging.getLogger(__name__)

FAIL_OPEN: Final = "fail-open"
FAIL_CLOSED: Final = "fail-closed"
# Ops per key: kind, then four values. Buckets ("b": rate/s, capacity, want, need) refill
# on Redis's own clock so replicas with skewed clocks agree; daily counts ("d": limit,
# want, need, ttl s) cap at the limit; in-flight sets ("c": limit, member, -, hold ms) drop
# members whose hold expired (a crashed replica's slots come back). Grants are all of
# ``want`` that is there when at least ``need`` is, else 0 and the wait in ms. In-flight
# slots are taken only when every token op passed, so a rejection holds no slot.
LEASE_SCRIPT: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
local denied = false
for i, key in ipairs(KEYS) do
  local base = (i - 1) * 5
  local kind = ARGV[base + 1]
  local a, b, c, d = tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3]),
                     tonumber(ARGV[base + 4]), tonumber(ARGV[base + 5])
  if kind == 'b' then
    local state = redis.call('HMGET', key, 'tokens', 'ts')
    local tokens, ts = tonumber(state[1]), tonumber(state[2])
    if tokens == nil then tokens, ts = b, now end
    if now > ts then tokens = math.min(b, tokens + (now - ts) * a / 1000) ; ts = now end
    local grant, wait = 0, 0
    if tokens >= d then
      grant = math.min(c, math.floor(tokens))
      tokens = tokens - grant
    else
      denied = true
      wait = math.ceil((math.min(d, b) - tokens) * 1000 / a)
    end
    redis.call('HSET', key, 'tokens', tostring(tokens), 'ts', ts)
    redis.call('PEXPIRE', key, math.ceil(b * 1000 / a) + 1000)
    out[#out + 1] = grant
    out[#out + 1] = wait
  elseif kind == 'd' then
    local used = tonumber(redis.call('GET', key) or '0')
    local grant = 0
    if a - used >= c then
      grant = math.min(b, a - used)
      redis.call('INCRBY', key, grant)
      redis.call('EXPIRE', key, d)
    else
      denied = true
    end
    out[#out + 1] = grant
    out[#out + 1] = 0
  else
    out[#out + 1] = 0
    out[#out + 1] = 0
  end
end
if not denied then
  for i, key in ipairs(KEYS) do
    local base = (i - 1) * 5
    if ARGV[base + 1] == 'c' then
      redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
      if redis.call('ZCARD', key) < tonumber(ARGV[base + 2]) then
        redis.call('ZADD', key, now + tonumber(ARGV[base + 5]), ARGV[base + 3])
        redis.call('PEXPIRE', key, tonumber(ARGV[base + 5]))
        out[2 * i - 1] = 1
      end
    end
  end
end
return out
"""
# Give back a daily lease on shutdown (capped at 0 so a reset day never goes negative).
RETURN_SCRIPT: Final = """
local left = tonumber(redis.call('GET', KEYS[1]) or '0') - tonumber(ARGV[1])
if left > 0 then redis.call('SET', KEYS[1], left, 'KEEPTTL') else redis.call('DEL', KEYS[1]) end
return left
"""


@dataclass(slots=True)
class _Lease:
    tokens: float = 0.0
    expires: float = 0.0


@dataclass(slots=True)
class _Op:
    lease_key: str
    redis_key: str
    args: tuple[str, float, float, float, float]
    need: float
    scope: Scope
    limit: str


@dataclass(slots=True)
class _SharedAdmission(Admission):
    store: RedisQuotaStore
    spent: list[tuple[str, float]] = field(default_factory=list)
    slots: list[tuple[str, str]] = field(default_factory=list)

    def refund(self) -> None:
        spent, self.spent = self.spent, []
        for lease_key, amount in spent:
            lease = self.store.leases.get(lease_key)
            if lease is not None:
                lease.tokens += amount

    def release(self) -> None:
        slots, self.slots = self.slots, []
        if slots:
            self.store.release_slots(slots)


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
        self.hold_s = hold_s
        self.prefix = prefix
        self.local = LocalQuotaStore(clock, wall)
        self.leases: dict[str, _Lease] = {}
        self.available = True
        self.outages = 0
        self._on_outage = on_outage
        self._down_since = 0.0
        # Fail fast: a dead Redis must cost a request a quarter second at most, once.
        self._client = aioredis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0), health_check_interval=0,
        )
        self._lease = self._client.register_script(LEASE_SCRIPT)
        self._return = self._client.register_script(RETURN_SCRIPT)
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
        if self.available:
            with contextlib.suppress(RedisError, OSError):
                await self._return_day_leases()
        await self._client.aclose()

    async def drain(self) -> None:
        """Wait for the in-flight slot releases sent in the background."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def charge(self, scopes: Sequence[Scope], rows: int) -> Admission:
        if self.available:
            try:
                return await self._charge_shared(scopes, rows)
            except (RedisError, OSError) as exc:
                self._mark_down(exc)
        if self.failure_mode == FAIL_CLOSED:
            raise QuotaUnavailableError(
                "quota store unavailable; retry shortly",
                trailers={RETRY_AFTER_KEY: str(math.ceil(self.reconnect_s * 1000)),
                          LIMIT_KEY: "quota_store"},
            )
        return self.local.charge_now(scopes, rows)

    async def _charge_shared(self, scopes: Sequence[Scope], rows: int) -> Admission:
        now = self.clock()
        wall = self.wall()
        day = int(wall // DAY_S)
        ops: list[_Op] = []
        slots: list[tuple[str, str]] = []
        for scope in scopes:
            ops.extend(self._token_ops(scope, rows, day, wall))
            if scope.limits.concurrent is not None:
                key = f"{self.prefix}{scope.key}:inflight"
                member = uuid.uuid4().hex
                ops.append(_Op("", key, ("c", scope.limits.concurrent, 0, 0, 0), 1, scope,
                               "concurrent"))
                slots.append((key, member))
        short = [op for op in ops if op.args[0] == "c" or not self._covered(op, now)]
        if short:
            members = iter(member for _, member in slots)
            argv: list[str | float] = []
            for op in short:
                kind, a, b, c, d = op.args
                argv.extend((kind, a, next(members) if kind == "c" else b, c,
                             self.hold_s * 1000 if kind == "c" else d))
            result = await self._lease(keys=[op.redis_key for op in short], args=argv)
            self._apply(short, [int(v) for v in result], now, wall)
        admission = _SharedAdmission(self, slots=slots)
        for op in ops:
            if op.lease_key:
                self.leases[op.lease_key].tokens -= op.need
                admission.spent.append((op.lease_key, op.need))
        return admission

    def _token_ops(self, scope: Scope, rows: int, day: int, wall: float) -> list[_Op]:
        limits, base = scope.limits, f"{self.prefix}{scope.key}"
        ops = []
        if limits.requests_per_s is not None:
            cap = limits.request_capacity()
            want = self._block(limits.requests_per_s, cap, 1)
            ops.append(_Op(f"{scope.key}:req", f"{base}:req",
                           ("b", limits.requests_per_s, cap, want, 1), 1, scope, "requests_per_s"))
        if limits.rows_per_s is not None:
            cap = limits.rows_capacity()
            want = self._block(limits.rows_per_s, cap, rows)
            ops.append(_Op(f"{scope.key}:rows", f"{base}:rows",
                           ("b", limits.rows_per_s, cap, want, rows), rows, scope, "rows_per_s"))
        if limits.requests_per_day is not None:
            per_day = limits.requests_per_day
            want = max(1, min(100, per_day // 1000))
            ttl = math.ceil(seconds_to_next_day(wall)) + 3600
            ops.append(_Op(f"{scope.key}:day:{day}", f"{base}:day:{day}",
                           ("d", per_day, want, 1, ttl), 1, scope, "requests_per_day"))
        return ops

    def _block(self, rate: float, capacity: float, need: float) -> float:
        # A lease covers a few tens of ms of the limit: few Redis calls per second, and at
        # most a block per replica is ever out of step with the shared bucket.
        return max(need, min(capacity, 100.0, math.floor(rate * self.lease_s)))

    def _covered(self, op: _Op, now: float) -> bool:
        lease = self.leases.get(op.lease_key)
        if lease is None:
            return False
        if now >= lease.expires and ":day:" not in op.lease_key:
            lease.tokens = 0.0  # an old rate lease would let a replica run ahead
        return lease.tokens >= op.need

    def _apply(self, ops: Sequence[_Op], result: Sequence[int], now: float, wall: float) -> None:
        denial: tuple[_Op, float] | None = None
        for i, op in enumerate(ops):
            grant, wait_ms = result[2 * i], result[2 * i + 1]
            if op.args[0] == "c":
                if grant == 0 and denial is None:
                    denial = (op, CONCURRENCY_RETRY_MS / 1000)
                continue
            lease = self.leases.setdefault(op.lease_key, _Lease())
            if grant > 0:
                lease.tokens += grant
                lease.expires = now + self.lease_ttl_s
            elif denial is None or denial[0].args[0] == "c":
                wait = seconds_to_next_day(wall) if op.args[0] == "d" else wait_ms / 1000
                denial = (op, wait)
        if denial is not None:
            # Tokens granted to other ops stay leased for the next request.
            raise exceeded(denial[0].limit, denial[0].scope, denial[1])

    def release_slots(self, slots: Sequence[tuple[str, str]]) -> None:
        if not self.available:
            return  # the members expire on their own after the hold time
        task = asyncio.get_running_loop().create_task(self._release(slots))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release(self, slots: Sequence[tuple[str, str]]) -> None:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, member in slots:
                    pipe.zrem(key, member)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._mark_down(exc)

    async def _return_day_leases(self) -> None:
        for lease_key, lease in self.leases.items():
            if ":day:" in lease_key and lease.tokens >= 1:
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
