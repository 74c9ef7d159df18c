"""The quota table one supervisor shares with its workers: a fixed-size file under /dev/shm
that each process mmaps, its layout and bounds checks, its byte-range locks, and its life."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import mmap
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from gateway.quota.rules import RULES, AnyRule

log = logging.getLogger(__name__)

# Why a plain file and not multiprocessing.shared_memory: the workers are spawned, and before
# Python 3.13 each spawned process's resource tracker may unlink a SharedMemory segment when
# that process exits, while fcntl locks need a file descriptor anyway. A file in /dev/shm is
# the same memory (tmpfs) with a descriptor, a name the supervisor controls, and mmap.
# magic, slots, columns (one in-flight counter per worker index), bytes per slot.
HEADER: Final = struct.Struct("<8sIII")
HEADER_SIZE: Final = 64
KEY_BYTES: Final = 16  # blake2b of the scope key: a different key never matches by chance
EMPTY_KEY: Final = bytes(KEY_BYTES)
COUNTER_BYTES: Final = 4  # an int32 per worker
DEFAULT_SLOTS: Final = 16384  # 1000 tenants, each with a dozen model scopes, at 2/3 load
MAX_SLOTS: Final = 1 << 20
MAX_COLUMNS: Final = 256  # the most workers settings allow
PREFIX: Final = "modelgate-quota-"
_NEW_PREFIX: Final = ".modelgate-quota-new-"  # not yet complete; the sweep ignores it


class QuotaTableError(Exception):
    """The table cannot be created, opened or trusted."""


@dataclass(frozen=True, slots=True)
class Layout:
    """A slot's layout, derived from the limit rules: the limits' fingerprint (0: never set
    up), then each rule's state (``rule.layout``), then, for each rule that counts slots,
    one int32 in-flight counter per worker. The magic is a hash of it, so a process built
    with other rules refuses to attach to the table instead of misreading it."""

    rules: tuple[AnyRule, ...]
    state: struct.Struct
    slot_rules: tuple[AnyRule, ...]
    magic: bytes

    @staticmethod
    def of(rules: Iterable[AnyRule]) -> Layout:
        rules = tuple(rules)
        words = ";".join(f"{r.name}/{r.key}:{r.layout}:{int(r.counters)}" for r in rules)
        digest = hashlib.blake2b(words.encode("utf-8"), digest_size=5).digest()
        return Layout(rules, struct.Struct("<Q" + "".join(r.layout for r in rules)),
                      tuple(r for r in rules if r.counters), b"MGQ" + digest)

    def slot_bytes(self, columns: int) -> int:
        """Bytes per slot: the state and the counters, rounded to 8 for the doubles."""
        counters = COUNTER_BYTES * columns * len(self.slot_rules)
        return (self.state.size + counters + 7) // 8 * 8

    def table_bytes(self, slots: int, columns: int) -> int:
        return HEADER_SIZE + slots * KEY_BYTES + slots * self.slot_bytes(columns)


def current_layout() -> Layout:
    """The layout of the rules now registered (RULES)."""
    return _layout_of(tuple(RULES))


@functools.lru_cache(maxsize=4)
def _layout_of(rules: tuple[AnyRule, ...]) -> Layout:
    return Layout.of(rules)


# This build's magic (with the rules it ships).
MAGIC: Final = current_layout().magic


def slot_bytes(columns: int) -> int:
    return current_layout().slot_bytes(columns)


def table_bytes(slots: int, columns: int) -> int:
    return current_layout().table_bytes(slots, columns)


def key_hash(key: str) -> bytes:
    """What the directory stores for a scope key; never the empty marker."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=KEY_BYTES).digest()
    return digest if digest != EMPTY_KEY else b"\x01" + digest[1:]


def default_folder() -> Path:
    """/dev/shm where it exists (memory, not disk), else the temporary folder."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return Path(tempfile.gettempdir())


class QuotaTable:
    """One process's mapping of the table. Locks are POSIX record locks (fcntl.lockf) on
    byte ranges of the file: the kernel drops them when their process dies, so a worker
    killed inside a charge cannot leave a slot locked. They are per process, so all calls
    must come from one thread (the event loop), as with LocalQuotaStore."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.layout = current_layout()
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise QuotaTableError(f"cannot open the quota table {path}: {exc}") from exc
        try:
            # A shared flock marks the file in use, so a later supervisor's sweep keeps it.
            fcntl.flock(self.fd, fcntl.LOCK_SH)
            self._map()
        except BaseException:
            os.close(self.fd)
            raise

    def _map(self) -> None:
        size = os.fstat(self.fd).st_size
        if size < HEADER_SIZE:
            raise QuotaTableError(f"quota table {self.path}: {size} bytes, no header")
        self.mm = mmap.mmap(self.fd, size)
        magic, slots, columns, per_slot = HEADER.unpack_from(self.mm, 0)
        # Nothing read from the file is used before it is checked against the file's size.
        problem = None
        layout = self.layout
        if magic[:3] == layout.magic[:3] and magic != layout.magic:
            problem = (f"laid out for other limits (layout {magic[3:].hex()}, this process's "
                       f"is {layout.magic[3:].hex()}): its workers run another modelgate "
                       "version with other limit rules, so it cannot be shared with them")
        elif magic != layout.magic:
            problem = "not a quota table (bad magic)"
        elif not (1 <= slots <= MAX_SLOTS and 1 <= columns <= MAX_COLUMNS):
            problem = f"{slots} slots and {columns} columns are out of range"
        elif (per_slot != layout.slot_bytes(columns)
              or size != layout.table_bytes(slots, columns)):
            problem = f"{size} bytes do not fit {slots} slots of {per_slot} bytes"
        if problem is not None:
            self.mm.close()
            raise QuotaTableError(f"quota table {self.path}: {problem}")
        self.slots: int = slots
        self.columns: int = columns
        self.slot_size: int = per_slot
        self._data: int = HEADER_SIZE + slots * KEY_BYTES
        # The table as int32s, for the in-flight counters: an item store through a
        # memoryview is one aligned 4-byte write, which a reader in another process sees
        # whole (struct's "<i" packs byte by byte). The size is a multiple of 8.
        self.ints = memoryview(self.mm).cast("i")

    def offset(self, index: int) -> int:
        """Byte offset of slot ``index``'s state (also its lock byte)."""
        if not 0 <= index < self.slots:
            raise QuotaTableError(f"slot {index} is outside the table's {self.slots}")
        return self._data + index * self.slot_size

    def lock(self, offset: int, length: int = 1) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX, length, offset)

    def unlock(self, offset: int, length: int = 1) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, length, offset)

    @contextlib.contextmanager
    def locked(self, offset: int = 0, length: int = 1) -> Iterator[None]:
        """Byte 0 (in the header) guards the directory; length 0 locks the whole file."""
        self.lock(offset, length)
        try:
            yield
        finally:
            self.unlock(offset, length)

    def find(self, digest: bytes) -> int | None:
        """The slot of a key hash, claimed if new (open addressing, linear probing); None
        when the table is full. Slots are never freed, so a found index stays valid."""
        start = int.from_bytes(digest[:8], "little") % self.slots
        with self.locked():
            for step in range(self.slots):
                index = (start + step) % self.slots
                at = HEADER_SIZE + index * KEY_BYTES
                stored = self.mm[at:at + KEY_BYTES]
                if stored == digest:
                    return index
                if stored == EMPTY_KEY:
                    # The state is still all zeros: "never set up" for the first charger.
                    self.mm[at:at + KEY_BYTES] = digest
                    return index
        return None

    def claimed(self) -> Iterator[int]:
        """Indices of the slots in use (call with the directory locked)."""
        for index in range(self.slots):
            at = HEADER_SIZE + index * KEY_BYTES
            if self.mm[at:at + KEY_BYTES] != EMPTY_KEY:
                yield index

    def counters(self, index: int) -> int:
        """Index in ``ints`` of slot ``index``'s first in-flight counter (worker 0's of the
        first slot-counting rule; each such rule has ``columns`` of them, in rule order)."""
        return (self.offset(index) + self.layout.state.size) // COUNTER_BYTES

    def reset_column(self, column: int) -> int:
        """Zero worker ``column``'s in-flight counters: what a dead process of that index
        left held. Returns how many it held."""
        if not 0 <= column < self.columns:
            raise QuotaTableError(f"worker {column} has no column in a {self.columns}-worker "
                                  "table")
        freed = 0
        with self.locked(0, 0):  # the whole file: every slot and the directory
            for index in self.claimed():
                first = self.counters(index) + column
                for group in range(len(self.layout.slot_rules)):
                    at = first + group * self.columns
                    freed += max(0, self.ints[at])
                    self.ints[at] = 0
        return freed

    def close(self) -> None:
        # Closing the descriptor also drops every record lock this process holds on it.
        with contextlib.suppress(ValueError, BufferError):
            self.ints.release()
            self.mm.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


class QuotaTableFile:
    """The supervisor's handle: created before the workers start, removed when it stops."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        with contextlib.suppress(OSError):
            os.close(self._fd)


def create_table(
    columns: int, slots: int = DEFAULT_SLOTS, folder: Path | None = None
) -> QuotaTableFile:
    """A new, zeroed table for ``columns`` workers. Stale tables of supervisors that died
    without removing theirs are swept first; a new table never reuses a name."""
    if not (1 <= slots <= MAX_SLOTS and 1 <= columns <= MAX_COLUMNS):
        raise QuotaTableError(f"{slots} slots for {columns} workers is out of range")
    folder = folder or default_folder()
    layout = current_layout()
    sweep_stale(folder)
    fd, temporary = tempfile.mkstemp(prefix=_NEW_PREFIX, dir=folder)  # mode 0600, O_EXCL
    try:
        # Held until remove(): while any process holds it, no sweep deletes the file.
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.ftruncate(fd, layout.table_bytes(slots, columns))  # tmpfs keeps zeros sparse
        os.pwrite(fd, HEADER.pack(layout.magic, slots, columns, layout.slot_bytes(columns)),
                  0)
        final = Path(folder) / (PREFIX + Path(temporary).name.removeprefix(_NEW_PREFIX))
        os.link(temporary, final)  # fails rather than replace an existing file
    except BaseException:
        os.close(fd)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    return QuotaTableFile(final, fd)


def sweep_stale(folder: Path) -> list[Path]:
    """Remove tables no process holds any more (their supervisor and workers died). A live
    table is flocked shared by its holders, so an exclusive try-lock fails on it."""
    removed: list[Path] = []
    with contextlib.suppress(OSError):
        for entry in Path(folder).glob(PREFIX + "*"):
            try:
                fd = os.open(entry, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue  # another user's, or gone already
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # in use
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
                    removed.append(entry)
                    log.info("removed stale quota table %s (its supervisor is gone)", entry)
            finally:
                os.close(fd)
    return removed
