"""The quota store shared by the workers of one supervisor: LocalQuotaStore's limits, kept in
the supervisor's shared-memory table (gateway/quota/table.py) so they hold across workers.

Why shared memory and not Redis or a supervisor process: a charge runs on the event loop for
every request of a limited tenant, so it must stay synchronous and a few microseconds; a
read-modify-write of one mmapped slot under an fcntl byte-range lock of that slot is that,
and the kernel drops the lock of a worker that dies holding it. Scopes in different slots
never contend. The buckets run on CLOCK_MONOTONIC, which all processes of a machine share.

What differs from LocalQuotaStore, on purpose:
- In-flight counts are kept per worker index (one column each); a worker restarted under an
  index zeroes its column at start, freeing what its dead predecessor held. Since a worker
  only ever writes its own column, a release is one store and takes no lock.
- When the tenants file changes, each worker reloads it on its own, about a second apart.
  The first worker that charges a scope with the new limits gives it fresh buckets (as
  LocalQuotaStore does); the others see the limits' fingerprint already in the slot and keep
  those buckets. A worker that has not reloaded yet uses the slot's buckets and its own
  concurrent and daily limits until it has. (Only a worker that first charges the scope in
  that second, still with the old limits, refills it once more: at most once per worker.)
- A full table (DEFAULT_SLOTS scopes) fails safe, not closed: a scope that finds no slot is
  limited by a LocalQuotaStore in each worker, as without the table, and the first such scope
  is logged as an error. Refusing the tenant's requests instead would turn a sizing problem
  into an outage.
A lock is held for the few microseconds of one charge, but waited for in the kernel: a worker
that is stopped (SIGSTOP, a debugger) inside a charge stalls the others charging that scope.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from hashlib import blake2b
from pathlib import Path

from gateway.quota.rules import RULES, On, SlotCount
from gateway.quota.store import (
    Admission,
    Charge,
    Clock,
    Limits,
    LocalQuotaStore,
    Scope,
    ScopeState,
    SyncQuotaStore,
)
from gateway.quota.table import QuotaTable, QuotaTableError, key_hash

log = logging.getLogger(__name__)

_ABSENT = -1.0  # an unset limit in a fingerprint (set limits are positive)


def fingerprint(limits: Limits) -> int:
    """A number naming these limits in every process (``hash()`` is per process); never 0,
    which marks a slot no worker has set up."""
    values = [_ABSENT if (v := limits.get(f.name)) is None else float(v)
              for f in RULES.fields()]
    digest = blake2b(struct.pack(f"<{len(values)}d", *values), digest_size=8).digest()
    return int.from_bytes(digest, "little") | 1


@dataclass(slots=True)
class _Slot:
    """Where a scope lives in the table, and the limits this worker last charged it with."""

    offset: int
    counters: int  # index in the table's ints of the slot's first in-flight counter
    own: int  # and of this worker's (add a rule's group times the columns for its own)
    seen: Limits | None = None


@dataclass(slots=True)
class _Charge:
    slot: _Slot
    limits: Limits
    taken: list[Charge]
    held: list[int]  # the in-flight counters (indices in the table's ints) it holds


@dataclass(slots=True)
class _SharedAdmission(Admission):
    store: SharedQuotaStore
    charges: list[_Charge] = field(default_factory=list)
    local: Admission | None = None
    refunded: bool = False
    released: bool = False

    def refund(self) -> None:
        if not self.refunded:
            self.refunded = True
            self.store.give_back(self.charges)
            if self.local is not None:
                self.local.refund()

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.store.free(self.charges)
            if self.local is not None:
                self.local.release()


class SharedQuotaStore(SyncQuotaStore):
    """Limits shared through the table at ``path`` by the workers of one supervisor; this
    process is worker ``index``. Raises QuotaTableError when the table cannot be used."""

    def __init__(
        self, path: Path, index: int, *, clock: Clock = time.monotonic, wall: Clock = time.time
    ) -> None:
        self.table = QuotaTable(path)
        if not 0 <= index < self.table.columns:
            self.table.close()
            raise QuotaTableError(f"worker {index} has no column in the quota table {path} "
                                  f"({self.table.columns} workers)")
        self.index = index
        self.clock = clock
        self.wall = wall
        self.local = LocalQuotaStore(clock, wall)  # for scopes the full table has no room for
        # The hot path's handles, looked up once.
        self._mm, self._ints, self._columns = self.table.mm, self.table.ints, self.table.columns
        self._lock, self._unlock = self.table.lock, self.table.unlock
        layout = self.table.layout
        self._state, self._rules = layout.state, layout.rules
        # Where each slot-counting rule's counters start, past a slot's first counter.
        self._groups = {rule.name: n * self._columns
                        for n, rule in enumerate(layout.slot_rules)}
        self._slots: dict[str, _Slot | None] = {}
        self._fingerprints: dict[Limits, int] = {}
        self._full_logged = False
        self._closed = False

    async def start(self) -> None:
        freed = self.table.reset_column(self.index)
        if freed:
            log.warning("freed %d in-flight quota slots a previous worker %d held", freed,
                        self.index)

    async def close(self) -> None:
        self._closed = True
        self.table.close()

    def charge_now(self, scopes: Sequence[Scope], rows: int, on: On = On.REQUEST
                   ) -> _SharedAdmission:
        """Check every scope, then charge every scope, all under the scopes' slot locks
        (taken in slot order, so two workers never wait on each other in a cycle)."""
        now = self.clock()
        wall = self.wall()
        shared: list[tuple[_Slot, Scope]] = []
        local: list[Scope] = []
        for scope in scopes:
            slot = self._slots.get(scope.key) or self._slot(scope.key)
            if slot is None:
                local.append(scope)
            else:
                shared.append((slot, scope))
        if len(shared) > 1:
            shared.sort(key=lambda pair: pair[0].offset)
        lock, unlock = self._lock, self._unlock
        for slot, _ in shared:
            lock(slot.offset)
        try:
            loaded = [self._load(scope, slot, rows, now, wall, on=on) for slot, scope in shared]
            admission = _SharedAdmission(self)
            if local:  # checks and charges its scopes, or raises having charged nothing
                admission.local = self.local.charge_now(local, rows, on)
            ints, groups = self._ints, self._groups
            charges = admission.charges
            for slot, stamp, state in loaded:
                taken = state.take(rows, wall, on)
                self._store(slot, stamp, state)
                held = [slot.own + groups[rule.name] for rule, _, _, _, holds in taken if holds]
                for own in held:
                    ints[own] += 1  # others read it under this lock, to check
                charges.append(_Charge(slot, state.limits, taken, held))
            return admission
        finally:
            for slot, _ in shared:
                unlock(slot.offset)

    def give_back(self, charges: Sequence[_Charge]) -> None:
        """Refund rate and period tokens, one slot at a time (a refund needs no
        atomicity)."""
        if self._closed:
            return
        table = self.table
        for charge in charges:
            with table.locked(charge.slot.offset):
                stamp, state = self._read(charge.limits, charge.slot)
                for rule, _, cost, wall, _ in charge.taken:
                    part = state.parts.get(rule.name)
                    if part is not None:
                        rule.refund(part, cost, wall)
                self._store(charge.slot, stamp, state)

    def free(self, charges: Sequence[_Charge]) -> None:
        """Give back in-flight slots. No lock: only this process writes its own counter,
        and a checker that reads it a moment before the store sees an earlier release."""
        if self._closed:
            return
        ints = self.table.ints
        for charge in charges:
            for own in charge.held:
                ints[own] = max(0, ints[own] - 1)

    def in_flight(self, key: str, name: str = "concurrent") -> int:
        """Slots of rule ``name`` a scope holds in every worker now (for tests)."""
        slot = self._slot(key)
        if slot is None:
            return self.local.in_flight(key, name)
        first = slot.counters + self._groups[name]
        with self.table.locked(slot.offset):
            return sum(self.table.ints[first:first + self.table.columns])

    def _slot(self, key: str) -> _Slot | None:
        try:
            return self._slots[key]
        except KeyError:
            pass
        index = self.table.find(key_hash(key))
        slot = None
        if index is None:
            if not self._full_logged:
                self._full_logged = True
                log.error("the shared quota table is full (%d scopes): scope %r and any "
                          "further new scopes are limited in each worker separately",
                          self.table.slots, key)
        else:
            counters = self.table.counters(index)
            slot = _Slot(self.table.offset(index), counters, counters + self.index)
        self._slots[key] = slot
        return slot

    def _fingerprint(self, limits: Limits) -> int:
        stamp = self._fingerprints.get(limits)
        if stamp is None:
            stamp = self._fingerprints[limits] = fingerprint(limits)
        return stamp

    def _load(
        self, scope: Scope, slot: _Slot, rows: int, now: float, wall: float, *, on: On
    ) -> tuple[_Slot, int, ScopeState]:
        """The slot's state (slot locked), checked for one more charge; set up first if
        this worker's limits are new to it and the slot does not already carry them."""
        limits = scope.limits
        stamp, state = self._read(limits, slot)
        if limits is not slot.seen and limits != slot.seen:
            slot.seen = limits
            mine = self._fingerprint(limits)
            if stamp != mine:
                # New scope, or the first worker to charge it since the limits changed: same
                # counters, fresh buckets, as LocalQuotaStore does.
                stamp = mine
                state.reset(now, renew=True)
                self._store(slot, stamp, state)
        ints, columns = self._ints, self._columns
        for name, group in self._groups.items():
            part = state.parts.get(name)
            if isinstance(part, SlotCount):
                first = slot.counters + group
                part.held = sum(ints[first:first + columns])
        state.check(scope, rows, now, wall, on)
        return slot, stamp, state

    def _read(self, limits: Limits, slot: _Slot) -> tuple[int, ScopeState]:
        values = self._state.unpack_from(self._mm, slot.offset)
        parts = {}
        at = 1
        for rule in self._rules:
            parts[rule.name] = rule.unpack(values[at:at + rule.width], limits)
            at += rule.width
        return values[0], ScopeState(limits, parts)

    def _store(self, slot: _Slot, stamp: int, state: ScopeState) -> None:
        parts = state.parts
        values = [stamp]
        for rule in self._rules:
            values.extend(rule.pack(parts.get(rule.name)))
        self._state.pack_into(self._mm, slot.offset, *values)
