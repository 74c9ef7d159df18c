"""What the Redis quota store leases: the Lua scripts that grant tokens and in-flight slots
(one op per kind of limit rule: bucket, period count, slots), and the per-scope slot pools
with the keeper that gives spares back and keeps holdings alive."""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from redis.exceptions import RedisError

from gateway.quota.rules import AnyRule, BucketRule, PeriodRule
from gateway.quota.store import Clock, Scope

# One generic script for every limit rule: an op per key, its kind that of the rule
# (token_op, SlotLeases), then four values; the last ARGV is the slots' hold in ms. Buckets
# ("b": rate/s, capacity, want, need) refill on Redis's own clock so replicas with skewed
# clocks agree; period counts ("d": limit, want, need, ttl s) cap at the limit; slot
# holdings ("c": limit, owner, want, held) are a hash per scope, a field per holding
# ("<slots>:<expiry ms>"): expired holdings are dropped (a crashed replica's slots come
# back), then the owner's holding becomes ``held`` plus what fits under the limit, up to
# ``want``. Token grants are all of ``want`` that is there when
# at least ``need`` is, else 0 and the wait in ms. Slots are granted only when every token
# op passed, so a rejection holds no slot; a slot grant of 0 means the limit is reached.
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
  local hold = tonumber(ARGV[#KEYS * 5 + 1])
  for i, key in ipairs(KEYS) do
    local base = (i - 1) * 5
    if ARGV[base + 1] == 'c' then
      local owner, want, held = ARGV[base + 3], tonumber(ARGV[base + 4]), tonumber(ARGV[base + 5])
      local flat = redis.call('HGETALL', key)
      local others = 0
      for j = 1, #flat, 2 do
        local n, exp = string.match(flat[j + 1], '^(%d+):(%d+)$')
        if exp == nil or tonumber(exp) <= now then redis.call('HDEL', key, flat[j])
        elseif flat[j] ~= owner then others = others + tonumber(n) end
      end
      local grant = math.max(0, math.min(want, tonumber(ARGV[base + 2]) - others - held))
      if held + grant > 0 then
        redis.call('HSET', key, owner, string.format('%d:%d', held + grant, now + hold))
        if redis.call('PTTL', key) < hold then redis.call('PEXPIRE', key, hold) end
      end
      out[2 * i - 1] = grant
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
class Lease:
    """Rate or period tokens this process holds for one scope and limit. Rate tokens lapse
    (an old lease would let a replica run ahead); period counts are given back on close."""

    tokens: float = 0.0
    expires: float = 0.0
    lapses: bool = True


@dataclass(slots=True)
class Op:
    """One token limit of one scope, as the lease script takes it."""

    lease_key: str
    redis_key: str
    args: tuple[str, float, float, float, float]
    need: float
    scope: Scope
    rule: AnyRule
    lapses: bool = True

    def retry_after(self, wall: float, wait_ms: int) -> float:
        """Seconds a denied charge should wait: the script's wait, or the period's end."""
        if isinstance(self.rule, PeriodRule):
            return self.rule.seconds_left(wall)
        return wait_ms / 1000


def token_op(rule: AnyRule, scope: Scope, cost: int, wall: float, *, lease_s: float,
             prefix: str) -> Op | None:
    """The lease script's op for one token rule of a scope (None: unset, or slots), by the
    rule's kind: a bucket leases about ``lease_s`` of its rate, capped at 100 and its size
    (never less than the charge needs); a period count leases a thousandth of its limit
    (1 to 100), its key living an hour past the period's end."""
    limits = scope.limits
    limit = limits.get(rule.name)
    if limit is None:
        return None
    if isinstance(rule, BucketRule):
        capacity = rule.capacity(limits)
        want = max(cost, min(capacity, 100.0, math.floor(limit * lease_s)))
        key = f"{scope.key}:{rule.key}"
        return Op(key, prefix + key, ("b", limit, capacity, want, cost), cost, scope, rule)
    if isinstance(rule, PeriodRule):
        want = max(1, min(100, int(limit) // 1000))
        ttl = math.ceil(rule.seconds_left(wall)) + 3600
        key = f"{scope.key}:{rule.key}:{rule.period(wall)}"
        return Op(key, prefix + key, ("d", limit, want, cost, ttl), cost, scope, rule,
                  lapses=False)
    return None


# A block is a few slots and never more than a quarter of the limit, so several replicas
# can share a small limit; a limit under 8 is leased one slot at a time.
BLOCK_MAX: Final = 8
BLOCK_SHARE: Final = 4
# One hash per scope, a field per holding: "<slots>:<expiry ms on Redis's clock>". The lease
# script grants slots; this one rewrites or drops a holding. The
# count is this process's own, written whole: every write of one holding happens under its
# pool's lock, so Redis sees them in order and a holding dropped by expiry comes back.
SYNC_SCRIPT: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local held, hold = tonumber(ARGV[2]), tonumber(ARGV[3])
if held > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], string.format('%d:%d', held, now + hold))
  if redis.call('PTTL', KEYS[1]) < hold then redis.call('PEXPIRE', KEYS[1], hold) end
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return held
"""


def block_size(limit: int) -> int:
    """Slots asked for at once under a concurrency limit of ``limit``."""
    return max(1, min(BLOCK_MAX, limit // BLOCK_SHARE))


@dataclass(slots=True, eq=False)
class SlotPool:
    """The slots this process holds in one scope: ``held`` granted by Redis, ``in_use`` by
    admitted requests. ``peak`` is the most in use (or just granted) since the keeper last
    looked: what is held above it stayed unused for a whole interval."""

    key: str
    owner: str
    scope: Scope
    rule: AnyRule
    limit: int
    held: int = 0
    in_use: int = 0
    peak: int = 0
    synced: float = 0.0
    orphaned_at: float | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def take(self) -> bool:
        """Take a held slot without Redis; False when every held one is in use."""
        # The limit too: a reload may lower it below what is held until the keeper trims.
        if self.in_use >= self.held or self.in_use >= self.limit:
            return False
        self.in_use += 1
        self.peak = max(self.peak, self.in_use)
        return True

    def put(self) -> None:
        self.in_use -= 1


class SlotLeases:
    """This process's holdings of in-flight slots. A background keeper gives back slots
    that stayed unused for a whole ``give_back_s`` and refreshes a holding's expiry every
    third of ``hold_s``, so a crashed process's slots come back after ``hold_s``."""

    def __init__(
        self,
        client: Any,
        *,
        prefix: str,
        hold_s: float,
        give_back_s: float,
        clock: Clock,
        available: Callable[[], bool],
        on_error: Callable[[BaseException], None],
    ) -> None:
        self.prefix = prefix
        self.hold_s = hold_s
        self.give_back_s = give_back_s
        self.clock = clock
        self.pools: dict[tuple[str, str], SlotPool] = {}  # by scope key and rule name
        self._available = available
        self._on_error = on_error
        self._sync = client.register_script(SYNC_SCRIPT)
        self._orphans: list[SlotPool] = []
        self._keeper: asyncio.Task[None] | None = None

    @property
    def hold_ms(self) -> int:
        return math.ceil(self.hold_s * 1000)

    def pool(self, scope: Scope, rule: AnyRule) -> SlotPool:
        """The pool of slot rule ``rule`` (set in the scope's limits) in ``scope``."""
        value = scope.limits.get(rule.name)
        assert value is not None
        limit = int(value)
        pool = self.pools.get((scope.key, rule.name))
        if pool is None:
            # A holding of its own per pool: one that is given up (an outage) can expire
            # or be dropped without touching the one that replaces it.
            pool = self.pools[scope.key, rule.name] = SlotPool(
                f"{self.prefix}{scope.key}:{rule.key}", uuid.uuid4().hex, scope, rule, limit)
        elif pool.scope is not scope:
            pool.scope, pool.limit = scope, limit
        return pool

    def granted(self, pool: SlotPool, grant: int, now: float) -> None:
        """Redis wrote the pool's holding, ``grant`` slots more than before."""
        pool.held += grant
        pool.synced = now
        pool.peak = pool.held  # new slots count as used until the keeper's next look
        if pool.orphaned_at is not None and pool not in self._orphans:
            self._orphans.append(pool)  # granted as the outage began: drop it once drained
        if pool.held > 0 and (self._keeper is None or self._keeper.done()):
            self._keeper = asyncio.get_running_loop().create_task(self._keep(), name="slots")

    def held(self, scope_key: str | None = None, rule: str = "concurrent") -> int:
        """Slots this process holds now, of one rule in one scope or all (for tests and
        metrics)."""
        if scope_key is not None:
            pool = self.pools.get((scope_key, rule))
            return pool.held if pool else 0
        return sum(pool.held for pool in self.pools.values())

    def orphan_all(self) -> None:
        """Redis is unreachable: forget the holdings. Requests in flight release into the
        old pools; their holdings expire in Redis, or are dropped once drained and Redis
        is back, whichever comes first."""
        now = self.clock()
        for pool in self.pools.values():
            pool.orphaned_at = now
            if pool.held > 0:
                self._orphans.append(pool)
        self.pools = {}

    async def close(self) -> None:
        """Give back every holding at once (requests still in flight included)."""
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        pools = [pool for pool in (*self.pools.values(), *self._orphans) if pool.held > 0]
        self.pools, self._orphans = {}, []
        for pool in pools:
            pool.held = 0
        if pools and self._available():
            with contextlib.suppress(RedisError, OSError):
                await self._write(pools)

    async def _keep(self) -> None:
        # Often enough for both jobs: spares back within two intervals, and a holding
        # refreshed a third of the hold time or more before it would expire.
        interval = min(self.give_back_s, self.hold_s / 3)
        while any(pool.held > 0 for pool in self.pools.values()) or self._orphans:
            await asyncio.sleep(interval)
            if not self._available():
                continue
            due = self._due()
            if not due:
                continue
            for pool in due:  # none is locked (see _due): acquiring does not wait
                await pool.lock.acquire()
            try:
                await self._write(due)
            except (RedisError, OSError) as exc:
                self._on_error(exc)
            finally:
                for pool in due:
                    pool.lock.release()

    def _due(self) -> list[SlotPool]:
        """Pools whose holding must be written now: fewer slots (spares given back), an
        expiry to refresh, or an old holding to drop."""
        now = self.clock()
        due = []
        for pool in self.pools.values():
            if pool.held == 0 or pool.lock.locked():
                continue  # a locked pool is being written already; look again next time
            # Slots above the peak were unused for the whole interval: give them back.
            spare, pool.peak = pool.held - pool.peak, pool.in_use
            if spare > 0 or now - pool.synced >= self.hold_s / 3:
                pool.held -= spare  # before Redis hears of it: never more in use than held
                due.append(pool)
        for pool in list(self._orphans):
            if pool.lock.locked():
                continue
            expired = pool.orphaned_at is not None and now - pool.orphaned_at > self.hold_s
            if pool.in_use == 0 or expired:
                self._orphans.remove(pool)
                if not expired:
                    pool.held = 0
                    due.append(pool)
        return due

    async def _write(self, pools: list[SlotPool]) -> None:
        now = self.clock()
        results = await asyncio.gather(
            *(self._sync(keys=[pool.key], args=[pool.owner, pool.held, self.hold_ms])
              for pool in pools),
            return_exceptions=True,
        )
        for pool, result in zip(pools, results, strict=True):
            if isinstance(result, BaseException):
                raise result
            pool.synced = now
