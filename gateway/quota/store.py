"""The quota store's API (charge, admit, refund, release, open a stream) and the in-process
store, which keeps each scope's state under every rule of gateway/quota/rules.py."""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final

from gateway.errors import (
    InvalidRequestError,
    OverloadedError,
    RequestTimeoutError,
)
from gateway.quota.rules import (
    DAY_S,
    RULES,
    SLOT_RETRY_MS,
    AnyRule,
    Limits,
    On,
    Scope,
    SlotCount,
    TokenBucket,
    exceeded,
)
from model_store.errors import InputMismatchError
from runtimes.errors import InvalidTensorError

__all__ = [
    "DAY_S", "LIMIT_NAMES", "REFUNDABLE", "Admission", "Clock", "Limits", "LocalQuotaStore",
    "On", "QuotaStore", "Scope", "ScopeState", "TokenBucket", "check_rows_fit", "exceeded",
    "seconds_to_next_day",
]

Clock = Callable[[], float]
# Rejections that happen before the runtime ran the request give their tokens back.
REFUNDABLE: Final[tuple[type[BaseException], ...]] = (
    InvalidRequestError, OverloadedError, RequestTimeoutError, InputMismatchError,
    InvalidTensorError, asyncio.CancelledError,
)
CONCURRENCY_RETRY_MS: Final = SLOT_RETRY_MS


class _LimitNames(Collection[str]):
    """Every limit a rejection can name (the ``modelgate-limit`` trailer up to its ';'),
    as the rules in force say: a fixed set, so rejections can be labelled by limit."""

    def __contains__(self, name: object) -> bool:
        return name in RULES.names

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(RULES.names))

    def __len__(self) -> int:
        return len(RULES.names)


LIMIT_NAMES: Final = _LimitNames()


def check_rows_fit(scopes: Sequence[Scope], rows: int, on: On = On.REQUEST) -> None:
    """Refuse a charge that could never pass in some scope (more rows than its row bucket
    holds): it gets no retry hint, since a client obeying one would retry for ever."""
    for rule in RULES.per_row(on):
        for scope in scopes:
            rule.fits(scope.limits, rows, scope)


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
    """Charges requests and open streams against scopes. ``charge`` raises
    QuotaExceededError (or QuotaUnavailableError) and has charged nothing when it raises.
    ``on`` says which rules a charge is for (RULES.on)."""

    @abc.abstractmethod
    async def charge(self, scopes: Sequence[Scope], rows: int, on: On = On.REQUEST
                     ) -> Admission:
        """Charge one request of ``rows`` rows (or one stream) to every scope, all or
        nothing."""

    def charge_at_once(self, scopes: Sequence[Scope], rows: int, on: On = On.REQUEST
                       ) -> Admission | None:
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

    async def admission(self, scopes: Sequence[Scope], rows: int, on: On = On.REQUEST
                        ) -> Admission:
        """Charge (at once when the store can); the caller runs the request inside
        ``with admission:``. Raises as ``charge`` does."""
        check_rows_fit(scopes, rows, on)
        admission = self.charge_at_once(scopes, rows, on)
        if admission is None:
            admission = await self.charge(scopes, rows, on)
        return admission

    async def open_stream(self, scopes: Sequence[Scope]) -> Admission:
        """Hold one open stream in each scope (the STREAM rules, e.g. ``streams``); the
        caller releases it when the stream ends, for any reason. Raises as ``charge``."""
        if not scopes:
            return NO_ADMISSION
        return await self.admission(scopes, 1, On.STREAM)


class SyncQuotaStore(QuotaStore):
    """A store that decides every charge on the spot, without waiting (``charge_now``)."""

    @abc.abstractmethod
    def charge_now(self, scopes: Sequence[Scope], rows: int, on: On = On.REQUEST
                   ) -> Admission:
        """Charge at once; raises as ``charge`` does."""

    async def charge(self, scopes: Sequence[Scope], rows: int, on: On = On.REQUEST
                     ) -> Admission:
        return self.charge_now(scopes, rows, on)

    def charge_at_once(self, scopes: Sequence[Scope], rows: int, on: On = On.REQUEST
                       ) -> Admission | None:
        return self.charge_now(scopes, rows, on)


class _NoAdmission(Admission):
    def refund(self) -> None:
        pass

    def release(self) -> None:
        pass


NO_ADMISSION: Final[Admission] = _NoAdmission()
# One charge of one rule: its state, what it took, when, and whether it holds a slot.
Charge = tuple[AnyRule, Any, int, float, bool]


@dataclass(slots=True)
class ScopeState:
    """One scope's state under each rule (``parts``, by rule name; absent or None while the
    rule has nothing to keep) and the rules' check, take and refund applied to it. The
    shared store loads the same state from its table, so every store applies one set of
    rules."""

    limits: Limits
    parts: dict[str, Any] = field(default_factory=dict)
    _active: dict[On, tuple[tuple[AnyRule, Any], ...]] = field(default_factory=dict)

    def reset(self, now: float, renew: bool = False) -> None:
        """State for the current limits: a new scope's, or (``renew``) after the limits
        changed: fresh buckets, the same counters."""
        limits, parts = self.limits, self.parts
        for rule in RULES:
            part = parts.get(rule.name)
            parts[rule.name] = (rule.renewed(part, limits, now) if renew
                                else part if part is not None else rule.fresh(limits, now))
        self._active.clear()

    def active(self, on: On) -> tuple[tuple[AnyRule, Any], ...]:
        """The rules for ``on`` with state here, in check order, with their state."""
        active = self._active.get(on)
        if active is None:
            parts = self.parts
            active = self._active[on] = tuple(
                (rule, part) for rule in RULES.on(on)
                if (part := parts.get(rule.name)) is not None)
        return active

    def check(self, scope: Scope, rows: int, now: float, wall: float,
              on: On = On.REQUEST) -> None:
        """Raise QuotaExceededError for the first limit one more charge would break."""
        for rule, part in self.active(on):
            rule.check(part, scope, rows if rule.per_row else 1, now, wall)

    def take(self, rows: int, wall: float, on: On = On.REQUEST) -> list[Charge]:
        """Charge one request of ``rows`` rows (after check passed for every scope)."""
        limits = self.limits
        charges: list[Charge] = []
        for rule, part in self.active(on):
            cost = rows if rule.per_row else 1
            charges.append((rule, part, cost, wall, rule.take(part, limits, cost)))
        return charges

    def held(self, name: str = "concurrent") -> int:
        """Slots of rule ``name`` held now."""
        part = self.parts.get(name)
        return part.held if isinstance(part, SlotCount) else 0


def give_back(charges: Sequence[Charge]) -> None:
    """Refund what charges took (their requests were rejected before running)."""
    for rule, part, cost, wall, _ in charges:
        rule.refund(part, cost, wall)


def free(charges: Sequence[Charge]) -> None:
    """Release the slots charges hold."""
    for rule, part, _, _, holds in charges:
        if holds:
            rule.release(part)


@dataclass(slots=True)
class _LocalAdmission(Admission):
    charges: list[Charge] = field(default_factory=list)
    refunded: bool = False
    released: bool = False

    def refund(self) -> None:
        if not self.refunded:
            self.refunded = True
            give_back(self.charges)

    def release(self) -> None:
        if not self.released:
            self.released = True
            free(self.charges)


class LocalQuotaStore(SyncQuotaStore):
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
            state.reset(now)
        elif state.limits is not scope.limits and state.limits != scope.limits:
            # The tenants file changed the limits: same counters (admissions hold them),
            # fresh buckets.
            state.limits = scope.limits
            state.reset(now, renew=True)
        return state

    def charge_now(self, scopes: Sequence[Scope], rows: int, on: On = On.REQUEST
                   ) -> _LocalAdmission:
        """The synchronous charge (the Redis store's fail-open fallback uses it too)."""
        now = self.clock()
        wall = self.wall()
        if len(scopes) == 1:  # the tenant's own limits only: the common case
            state = self._state(scopes[0], now)
            state.check(scopes[0], rows, now, wall, on)
            return _LocalAdmission(state.take(rows, wall, on))
        states = [(scope, self._state(scope, now)) for scope in scopes]
        for scope, state in states:
            state.check(scope, rows, now, wall, on)
        admission = _LocalAdmission()
        for _, state in states:
            admission.charges.extend(state.take(rows, wall, on))
        return admission

    def in_flight(self, key: str, name: str = "concurrent") -> int:
        """Slots of rule ``name`` (requests admitted and not yet released) a scope holds now
        (for tests and metrics)."""
        state = self._scopes.get(key)
        return state.held(name) if state else 0
