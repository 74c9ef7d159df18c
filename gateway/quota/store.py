"""Per-tenant limits and the in-process quota store: token buckets for requests/s and rows/s,
in-flight counters, daily request counts, and the admit/refund API the servicer uses."""

from __future__ import annotations

import abc
import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final

from gateway.errors import (
    LIMIT_KEY,
    RETRY_AFTER_KEY,
    InvalidRequestError,
    OverloadedError,
    QuotaExceededError,
    RequestTimeoutError,
)
from model_store.errors import InputMismatchError
from runtimes.errors import InvalidTensorError

Clock = Callable[[], float]
DAY_S: Final = 86400
# Rejections that happen before the runtime ran the request give their tokens back.
REFUNDABLE: Final[tuple[type[BaseException], ...]] = (
    InvalidRequestError, OverloadedError, RequestTimeoutError, InputMismatchError,
    InvalidTensorError, asyncio.CancelledError,
)
# A full concurrency slot frees as soon as any request of the tenant finishes.
CONCURRENCY_RETRY_MS: Final = 50
# Every limit a rejection can name (the ``modelgate-limit`` trailer up to its ';'): a
# fixed set, so rejections can be labelled by limit in metrics.
LIMIT_NAMES: Final = frozenset({
    "requests_per_s", "rows_per_s", "rows_burst", "concurrent", "requests_per_day",
})


@dataclass(frozen=True, slots=True)
class Limits:
    """One scope's limits; None means unlimited. Bursts default to one second's worth."""

    requests_per_s: float | None = None
    burst: int | None = None
    rows_per_s: float | None = None
    rows_burst: int | None = None
    concurrent: int | None = None
    requests_per_day: int | None = None

    def request_capacity(self) -> float:
        assert self.requests_per_s is not None
        return float(self.burst or max(1, math.ceil(self.requests_per_s)))

    def rows_capacity(self) -> float:
        assert self.rows_per_s is not None
        return float(self.rows_burst or max(1, math.ceil(self.rows_per_s)))

    def is_unlimited(self) -> bool:
        return all(
            v is None for v in (self.requests_per_s, self.rows_per_s, self.concurrent,
                                self.requests_per_day)
        )


@dataclass(frozen=True, slots=True)
class Scope:
    """What a request is charged against: a stable key (tenant, or tenant and model), the
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


def check_rows_fit(scopes: Sequence[Scope], rows: int) -> None:
    """Refuse a request with more rows than a scope's row bucket holds: it could never pass,
    so it gets no retry hint (a client obeying one would retry for ever)."""
    for scope in scopes:
        limits = scope.limits
        if limits.rows_per_s is None or rows <= limits.rows_capacity():
            continue
        name = f"rows_burst;{scope.label}" if scope.label else "rows_burst"
        burst = int(limits.rows_capacity())
        given = "" if limits.rows_burst else " (one second of rows_per_s)"
        raise QuotaExceededError(
            f"quota exceeded: {name}: a request of {rows} rows can never pass a limit of "
            f"{burst} rows{given}; send at most {burst} rows per request",
            trailers={LIMIT_KEY: name},
        )


def seconds_to_next_day(wall: float) -> float:
    """Seconds until the next UTC midnight: when daily quotas reset."""
    return DAY_S - (wall % DAY_S)


class Admission(abc.ABC):
    """What one admitted request holds: tokens it may give back, a slot it must free. As a
    context manager around the request's run: refunded when the run was rejected before it
    ran (the REFUNDABLE errors), released always."""

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if isinstance(error, REFUNDABLE):
            self.refund()
        self.release()

    @abc.abstractmethod
    def refund(self) -> None:
        """Give back the request's rate and daily tokens (it was rejected before running)."""

    @abc.abstractmethod
    def release(self) -> None:
        """Free the request's in-flight slot; called exactly once when it is done."""


class QuotaStore(abc.ABC):
    """Charges requests against scopes. ``charge`` raises QuotaExceededError (or
    QuotaUnavailableError) and has charged nothing when it raises."""

    @abc.abstractmethod
    async def charge(self, scopes: Sequence[Scope], rows: int) -> Admission:
        """Charge one request of ``rows`` rows to every scope, all or nothing."""

    def charge_at_once(self, scopes: Sequence[Scope], rows: int) -> Admission | None:
        """``charge`` without waiting, for a store that can decide on the spot (in-process
        counters); None means: await ``charge``. Raises as ``charge`` does."""
        return None

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect or start background work; the default has none."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and give back unused leases; the default has none."""

    @asynccontextmanager
    async def admit(self, scopes: Sequence[Scope], rows: int) -> AsyncIterator[Admission]:
        """Charge, run the body, refund when the body is rejected before running (the
        REFUNDABLE errors), and always free the in-flight slot."""
        with (await self.admission(scopes, rows) if scopes else NO_ADMISSION) as admission:
            yield admission


    async def admission(self, scopes: Sequence[Scope], rows: int) -> Admission:
        """Charge (at once when the store can); the caller runs the request inside
        ``with admission:``. Raises as ``charge`` does."""
        check_rows_fit(scopes, rows)
        admission = self.charge_at_once(scopes, rows)
        if admission is None:
            admission = await self.charge(scopes, rows)
        return admission


class _NoAdmission(Admission):
    def refund(self) -> None:
        pass

    def release(self) -> None:
        pass


NO_ADMISSION: Final[Admission] = _NoAdmission()


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
class ScopeState:
    """One scope's counters and the rules that check, charge and refund them; the shared
    store loads the same state from its table, so both stores apply one set of rules."""

    limits: Limits
    requests: TokenBucket | None = None
    rows: TokenBucket | None = None
    in_flight: int = 0
    day: int = -1
    day_count: int = 0

    def reset_buckets(self, now: float) -> None:
        """Fresh, full buckets for the current limits (new scope, or changed limits)."""
        limits = self.limits
        self.requests = self.rows = None
        if limits.requests_per_s is not None:
            cap = limits.request_capacity()
            self.requests = TokenBucket(limits.requests_per_s, cap, cap, now)
        if limits.rows_per_s is not None:
            cap = limits.rows_capacity()
            self.rows = TokenBucket(limits.rows_per_s, cap, cap, now)

    def check(self, scope: Scope, rows: int, now: float, wall: float) -> None:
        """Raise QuotaExceededError for the first limit one more request would break."""
        limits = self.limits
        day = int(wall // DAY_S)
        if limits.concurrent is not None and self.in_flight >= limits.concurrent:
            raise exceeded("concurrent", scope, CONCURRENCY_RETRY_MS / 1000)
        if limits.requests_per_day is not None:
            if self.day != day:
                self.day, self.day_count = day, 0
            if self.day_count >= limits.requests_per_day:
                raise exceeded("requests_per_day", scope, seconds_to_next_day(wall))
        if self.requests is not None:
            self.requests.refill(now)
            if self.requests.tokens < 1:
                raise exceeded("requests_per_s", scope, self.requests.wait_for(1))
        if self.rows is not None:
            self.rows.refill(now)
            if self.rows.tokens < rows:
                raise exceeded("rows_per_s", scope, self.rows.wait_for(rows))

    def take(self, rows: int) -> None:
        """Charge one request of ``rows`` rows (after check passed for every scope)."""
        if self.requests is not None:
            self.requests.tokens -= 1
        if self.rows is not None:
            self.rows.tokens -= rows
        if self.limits.concurrent is not None:
            self.in_flight += 1
        if self.limits.requests_per_day is not None:
            self.day_count += 1

    def give_back(self, rows: int, day: int) -> None:
        """Return a request's rate tokens, and its daily count while the day is the same."""
        if self.requests is not None:
            self.requests.tokens = min(self.requests.capacity, self.requests.tokens + 1)
        if self.rows is not None:
            self.rows.tokens = min(self.rows.capacity, self.rows.tokens + rows)
        if self.limits.requests_per_day is not None and self.day == day:
            self.day_count = max(0, self.day_count - 1)


@dataclass(slots=True)
class _LocalAdmission(Admission):
    store: LocalQuotaStore
    charges: list[tuple[ScopeState, int, int]] = field(default_factory=list)
    refunded: bool = False
    released: bool = False

    def refund(self) -> None:
        if not self.refunded:
            self.refunded = True
            self.store.give_back(self.charges)

    def release(self) -> None:
        if not self.released:
            self.released = True
            for state, _, _ in self.charges:
                if state.limits.concurrent is not None:
                    state.in_flight -= 1


class LocalQuotaStore(QuotaStore):
    """Every limit kept in this process. Single-threaded by design: all calls come from the
    server's event loop, so a check and its charge cannot interleave."""

    def __init__(self, clock: Clock = time.monotonic, wall: Clock = time.time) -> None:
        self.clock = clock
        self.wall = wall
        self._scopes: dict[str, ScopeState] = {}

    def _state(self, scope: Scope, now: float) -> ScopeState:
        state = self._scopes.get(scope.key)
        if state is None:
            state = self._scopes[scope.key] = ScopeState(limits=scope.limits)
            state.reset_buckets(now)
        elif state.limits is not scope.limits and state.limits != scope.limits:
            # The tenants file changed the limits: same counters (admissions hold this
            # object), fresh buckets.
            state.limits = scope.limits
            state.reset_buckets(now)
        return state

    async def charge(self, scopes: Sequence[Scope], rows: int) -> Admission:
        return self.charge_now(scopes, rows)

    def charge_at_once(self, scopes: Sequence[Scope], rows: int) -> Admission | None:
        return self.charge_now(scopes, rows)

    def charge_now(self, scopes: Sequence[Scope], rows: int) -> _LocalAdmission:
        """The synchronous charge (the Redis store's fail-open fallback uses it too)."""
        now = self.clock()
        wall = self.wall()
        day = int(wall // DAY_S)
        if len(scopes) == 1:  # the tenant's own limits only: the common case
            state = self._state(scopes[0], now)
            state.check(scopes[0], rows, now, wall)
            state.take(rows)
            return _LocalAdmission(self, [(state, rows, day)])
        states = [(scope, self._state(scope, now)) for scope in scopes]
        for scope, state in states:
            state.check(scope, rows, now, wall)
        admission = _LocalAdmission(self)
        for _, state in states:
            state.take(rows)
            admission.charges.append((state, rows, day))
        return admission

    def give_back(self, charges: Sequence[tuple[ScopeState, int, int]]) -> None:
        for state, rows, day in charges:
            state.give_back(rows, day)

    def in_flight(self, key: str) -> int:
        """Requests of a scope now admitted and not yet released (for tests and metrics)."""
        state = self._scopes.get(key)
        return state.in_flight if state else 0
