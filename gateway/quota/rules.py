"""The limits a tenant can be given, each defined once as a LimitRule: its tenants-file keys,
what it counts, and how a charge is checked, taken, refunded and released. The stores, the
shared table's layout, the Redis lease ops, the tenants file, `modelgate tenants` and the
docs' table of limits all derive from the registry ``RULES``."""

from __future__ import annotations

import abc
import enum
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from gateway.errors import LIMIT_KEY, RETRY_AFTER_KEY, QuotaExceededError

DAY_S: Final = 86400
# A full slot frees as soon as any holder of the tenant finishes.
SLOT_RETRY_MS: Final = 50

P = TypeVar("P")


class On(enum.Enum):
    """What takes a charge: each request (ModelInfer, a stream message), or each open
    stream (held from its start to its end)."""

    REQUEST = "request"
    STREAM = "stream"


@dataclass(frozen=True, slots=True)
class Field:
    """One tenants-file key of a rule: its name and type (each positive, at most 1e9)."""

    name: str
    kind: type[int] | type[float]


@dataclass(frozen=True, slots=True)
class Scope:
    """What a charge is counted against: a stable key (tenant, or tenant and model), the
    limits there, and the label a rejection names (``modelgate-limit`` trailer suffix)."""

    key: str
    limits: Limits
    label: str = ""


def exceeded(limit: str, scope: Scope, retry_after_s: float) -> QuotaExceededError:
    """The rejection for ``limit`` of ``scope``, with the retry hint trailers."""
    name = f"{limit};{scope.label}" if scope.label else limit
    retry_ms = max(1, math.ceil(retry_after_s * 1000))
    return QuotaExceededError(
        f"quota exceeded: {name}; retry in {retry_ms} ms",
        trailers={RETRY_AFTER_KEY: str(retry_ms), LIMIT_KEY: name},
    )


@dataclass(slots=True)
class TokenBucket:
    """A token bucket on a monotonic clock; ``rate`` tokens per second up to ``capacity``."""

    rate: float
    capacity: float
    tokens: float
    updated: float

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, cost: float) -> float:
        """Seconds until ``cost`` tokens are there (after refill); cost above the capacity
        can never pass, so the hint is a full refill."""
        missing = min(cost, self.capacity) - self.tokens
        return max(missing, 0.0) / self.rate if self.rate > 0 else float(DAY_S)


@dataclass(slots=True)
class PeriodCount:
    """Charges counted in one period (its index since the epoch; -1: none yet)."""

    period: int = -1
    count: int = 0


@dataclass(slots=True)
class SlotCount:
    """Slots held now (requests admitted and not answered, streams open)."""

    held: int = 0


class LimitRule(abc.ABC, Generic[P]):
    """One limit. ``name`` is its main tenants-file key and what a rejection names (the
    ``modelgate-limit`` trailer, the metrics' ``limit`` label); ``key`` names its state in
    Redis keys. A rule's state in a scope is a ``P`` (None while the limit is unset)."""

    # How the rule's state is kept in a shared-table slot: struct items (and their count),
    # and whether it keeps one in-flight counter per worker instead.
    layout: str = ""
    width: int = 0
    counters: bool = False
    # Lower ranks are checked first, so a request over several limits is told of one that
    # does not refill by itself before a bucket's wait.
    rank: int = 0
    # Whether a charge costs its rows (else 1), so that it may never fit (``fits``).
    per_row: bool = False

    def __init__(self, name: str, *, key: str, unit: str, meaning: str,
                 on: On = On.REQUEST, per_model: bool = True) -> None:
        self.name = name
        self.key = key
        self.unit = unit
        self.meaning = meaning
        self.on = on
        self.per_model = per_model

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    @property
    def fields(self) -> tuple[Field, ...]:
        return (Field(self.name, int),)

    @property
    def names(self) -> tuple[str, ...]:
        """What a rejection by this rule can name."""
        return (self.name,)

    def validate(self, values: dict[str, Any], where: str) -> str | None:
        """What is wrong with these values of the rule's fields together, if anything."""
        return None

    def cost(self, rows: int) -> int:
        """What one charge of ``rows`` rows takes."""
        return rows if self.per_row else 1

    def fits(self, limits: Limits, cost: int, scope: Scope) -> None:
        """Raise when a charge of ``cost`` could never pass, however long it waited."""

    @abc.abstractmethod
    def fresh(self, limits: Limits, now: float) -> P | None:
        """The state of a scope new to this rule (None: the limit is unset)."""

    def renewed(self, part: P | None, limits: Limits, now: float) -> P | None:
        """The state after the scope's limits changed: by default the same counters."""
        return part if part is not None else self.fresh(limits, now)

    @abc.abstractmethod
    def check(self, part: P, scope: Scope, cost: int, now: float,
              wall: float) -> None:
        """Raise QuotaExceededError when one more charge of ``cost`` breaks the limit."""

    @abc.abstractmethod
    def take(self, part: P, limits: Limits, cost: int) -> bool:
        """Charge ``cost`` (after every check passed); True when it holds a slot."""

    def refund(self, part: P, cost: int, wall: float) -> None:
        """Give back what a charge made at ``wall`` took (rejected before it ran)."""

    def release(self, part: P) -> None:
        """Free the slot a charge holds."""

    def pack(self, part: P | None) -> tuple[Any, ...]:
        """The state as the shared table's struct items (``layout``)."""
        return ()

    def unpack(self, values: tuple[Any, ...], limits: Limits) -> P | None:
        return None


class BucketRule(LimitRule[TokenBucket]):
    """A token bucket: ``name`` per second, ``size`` tokens at most (default: one second's
    worth, at least 1). A per-row rule costs a request its rows."""

    layout = "4d"  # tokens, updated, rate, capacity (0: no bucket)
    width = 4
    rank = 2

    def __init__(self, name: str, *, size: str, per_row: bool = False, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.size = size
        self.per_row = per_row

    @property
    def fields(self) -> tuple[Field, ...]:
        return (Field(self.name, float), Field(self.size, int))

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, self.size) if self.per_row else (self.name,)

    def validate(self, values: dict[str, Any], where: str) -> str | None:
        if self.size in values and self.name not in values:
            return f"{where}: {self.size} needs {self.name}"
        return None

    def capacity(self, limits: Limits) -> float:
        rate = limits.get(self.name)
        assert rate is not None
        return float(limits.get(self.size) or max(1, math.ceil(rate)))

    def fits(self, limits: Limits, cost: int, scope: Scope) -> None:
        if limits.get(self.name) is None or cost <= self.capacity(limits):
            return
        name = f"{self.size};{scope.label}" if scope.label else self.size
        size = int(self.capacity(limits))
        given = "" if limits.get(self.size) else f" (one second of {self.name})"
        raise QuotaExceededError(
            f"quota exceeded: {name}: a request of {cost} {self.unit} can never pass a limit "
            f"of {size} {self.unit}{given}; send at most {size} {self.unit} per request",
            trailers={LIMIT_KEY: name},
        )

    def fresh(self, limits: Limits, now: float) -> TokenBucket | None:
        rate = limits.get(self.name)
        if rate is None:
            return None
        capacity = self.capacity(limits)
        return TokenBucket(rate, capacity, capacity, now)

    def renewed(self, part: TokenBucket | None, limits: Limits, now: float
                ) -> TokenBucket | None:
        return self.fresh(limits, now)  # new limits: a fresh, full bucket

    def check(self, part: TokenBucket, scope: Scope, cost: int, now: float,
              wall: float) -> None:
        part.refill(now)
        if part.tokens < cost:
            raise exceeded(self.name, scope, part.wait_for(cost))

    def take(self, part: TokenBucket, limits: Limits, cost: int) -> bool:
        part.tokens -= cost
        return False

    def refund(self, part: TokenBucket, cost: int, wall: float) -> None:
        part.tokens = min(part.capacity, part.tokens + cost)

    def pack(self, part: TokenBucket | None) -> tuple[Any, ...]:
        if part is None:
            return (0.0, 0.0, 0.0, 0.0)
        return (part.tokens, part.updated, part.rate, part.capacity)

    def unpack(self, values: tuple[Any, ...], limits: Limits) -> TokenBucket | None:
        tokens, updated, rate, capacity = values
        return TokenBucket(rate, capacity, tokens, updated) if capacity > 0 else None


class PeriodRule(LimitRule[PeriodCount]):
    """A count per fixed period of ``period_s`` seconds of UTC wall time, reset at each
    period's start (a UTC day: midnight)."""

    layout = "2q"  # period index, count
    width = 2
    rank = 1

    def __init__(self, name: str, *, period_s: int, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.period_s = period_s

    def period(self, wall: float) -> int:
        return int(wall // self.period_s)

    def seconds_left(self, wall: float) -> float:
        """Seconds until the next period starts: when the count resets."""
        return self.period_s - (wall % self.period_s)

    def fresh(self, limits: Limits, now: float) -> PeriodCount | None:
        return PeriodCount() if limits.get(self.name) is not None else None

    def check(self, part: PeriodCount, scope: Scope, cost: int, now: float,
              wall: float) -> None:
        limit = scope.limits.get(self.name)
        if limit is None:
            return
        period = self.period(wall)
        if part.period != period:
            part.period, part.count = period, 0
        if part.count + cost > limit:
            raise exceeded(self.name, scope, self.seconds_left(wall))

    def take(self, part: PeriodCount, limits: Limits, cost: int) -> bool:
        if limits.get(self.name) is not None:
            part.count += cost
        return False

    def refund(self, part: PeriodCount, cost: int, wall: float) -> None:
        if part.period == self.period(wall):
            part.count = max(0, part.count - cost)

    def pack(self, part: PeriodCount | None) -> tuple[Any, ...]:
        return (-1, 0) if part is None else (part.period, part.count)

    def unpack(self, values: tuple[Any, ...], limits: Limits) -> PeriodCount | None:
        # Kept while this process has the limit unset: other workers may have it set.
        return PeriodCount(values[0], values[1])


class SlotRule(LimitRule[SlotCount]):
    """At most ``name`` held at once: taken when charged, freed when released. In the
    shared table each worker keeps its own count of them (one int32 column per worker)."""

    counters = True
    rank = 0

    def fresh(self, limits: Limits, now: float) -> SlotCount | None:
        return SlotCount() if limits.get(self.name) is not None else None

    def check(self, part: SlotCount, scope: Scope, cost: int, now: float,
              wall: float) -> None:
        limit = scope.limits.get(self.name)
        if limit is not None and part.held >= limit:
            raise exceeded(self.name, scope, SLOT_RETRY_MS / 1000)

    def take(self, part: SlotCount, limits: Limits, cost: int) -> bool:
        if limits.get(self.name) is None:
            return False
        part.held += 1
        return True

    def release(self, part: SlotCount) -> None:
        part.held -= 1

    def unpack(self, values: tuple[Any, ...], limits: Limits) -> SlotCount | None:
        return SlotCount() if limits.get(self.name) is not None else None


AnyRule = LimitRule[Any]


class LimitRegistry:
    """The rules in force, in their tenants-file order, and what derives from them."""

    def __init__(self, *rules: AnyRule) -> None:
        self._rules: tuple[AnyRule, ...] = ()
        self._by_field: dict[str, Field] = {}
        self._on: dict[On, tuple[AnyRule, ...]] = {}
        self._per_row: dict[On, tuple[AnyRule, ...]] = {}
        self.names: frozenset[str] = frozenset()
        for rule in rules:
            self.register(rule)

    def __iter__(self) -> Iterator[AnyRule]:
        return iter(self._rules)

    def register(self, rule: AnyRule) -> None:
        """Add a rule; its keys must be new."""
        taken = {f.name for f in self.fields()} | {r.key for r in self._rules}
        clash = {f.name for f in rule.fields} & taken or ({rule.key} & taken)
        if clash:
            raise ValueError(f"limit rule {rule.name}: {', '.join(sorted(clash))} is taken")
        self._set((*self._rules, rule))

    def unregister(self, name: str) -> None:
        self._set(tuple(r for r in self._rules if r.name != name))

    def _set(self, rules: tuple[AnyRule, ...]) -> None:
        self._rules = rules
        self._by_field = {f.name: f for rule in rules for f in rule.fields}
        self._on = {on: tuple(sorted((r for r in rules if r.on is on), key=lambda r: r.rank))
                    for on in On}
        self._per_row = {on: tuple(r for r in self._on[on] if r.per_row) for on in On}
        self.names = frozenset(name for rule in rules for name in rule.names)

    def fields(self) -> tuple[Field, ...]:
        """Every tenants-file limit key, in file order."""
        return tuple(self._by_field.values())

    def field(self, name: str) -> Field | None:
        return self._by_field.get(name)

    def on(self, on: On) -> tuple[AnyRule, ...]:
        """The rules a charge for ``on`` checks, in check order."""
        return self._on[on]

    def per_row(self, on: On) -> tuple[AnyRule, ...]:
        """The rules for ``on`` whose charge costs its rows (which may never fit)."""
        return self._per_row[on]

    def docs_table(self) -> list[str]:
        """The docs' table of limits (docs/tenants.md), one Markdown row per rule."""
        rows = ["| key | limits |", "|---|---|"]
        for rule in self._rules:
            keys = ", ".join(f"`{f.name}`" for f in rule.fields)
            rows.append(f"| {keys} | {rule.meaning} |")
        return rows


class Limits:
    """One scope's limits by tenants-file key (``Limits(requests_per_s=5.0, concurrent=2)``);
    a key left out, or None, is unlimited. Immutable and hashable."""

    __slots__ = ("_hash", "_values")

    def __init__(self, **values: float | None) -> None:
        unknown = [name for name in values if RULES.field(name) is None]
        if unknown:
            raise TypeError(f"unknown limit(s): {', '.join(sorted(unknown))}")
        self._values: dict[str, float] = {
            f.name: v for f in RULES.fields() if (v := values.get(f.name)) is not None
        }
        self._hash = hash(frozenset(self._values.items()))

    def get(self, name: str) -> float | None:
        return self._values.get(name)

    def items(self) -> list[tuple[str, float]]:
        """The limits that are set, in tenants-file order."""
        return list(self._values.items())

    def charges(self, on: On) -> bool:
        """Whether any limit charged for ``on`` is set."""
        return any(self._values.get(rule.name) is not None for rule in RULES.on(on))

    def is_unlimited(self) -> bool:
        return not any(self.charges(on) for on in On)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Limits) and self._values == other._values

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"Limits({', '.join(f'{k}={v!r}' for k, v in self._values.items())})"


# The limits, in tenants-file order. Adding one is a rule here plus its tests.
RULES: Final = LimitRegistry(
    BucketRule("requests_per_s", size="burst", key="req", unit="requests",
               meaning="a token bucket of requests; `burst` is its size (default: one "
                       "second's worth, at least 1)"),
    BucketRule("rows_per_s", size="rows_burst", per_row=True, key="rows", unit="rows",
               meaning="a token bucket of rows; `rows_burst` is its size (default: one "
                       "second's worth, at least 1)"),
    SlotRule("concurrent", key="slots", unit="requests",
             meaning="requests admitted and not yet answered (queued or running)"),
    PeriodRule("requests_per_day", period_s=DAY_S, key="day", unit="requests",
               meaning="requests per UTC day; the count resets at 00:00 UTC"),
    SlotRule("streams", key="streams", unit="streams", on=On.STREAM, per_model=False,
             meaning="ModelStreamInfer streams open at once (`limits` only: a stream "
                     "names no model until its messages do)"),
)
