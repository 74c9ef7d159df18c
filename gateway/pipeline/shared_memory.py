"""System shared memory (Triton's extension), transport-free: the regions each tenant
registered (a /dev/shm object, an offset and a size in it) and tensor bytes read from and
written to them, every offset and size checked against the region first."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from gateway.errors import (
    InvalidRequestError,
    PayloadTooLargeError,
    SharedMemoryLimitError,
    SharedMemoryNotFoundError,
)
from gateway.pipeline.tensors import check_name, to_raw
from gateway.request.decoded import MemoryRef
from gateway.sanitize import echoed
from model_store.datatypes import DataType
from runtimes.base import Tensor

SHM_ROOT: Final = "/dev/shm"
# A POSIX shared-memory name as shm_open takes it: one path component under /dev/shm,
# optionally written with its leading '/'. Nothing else is reachable.
_KEY: Final = re.compile(r"/?([A-Za-z0-9_][A-Za-z0-9_.\-]{0,254})")
# The gateway's own shared-memory objects (quota state across workers) are never a region.
RESERVED_PREFIX: Final = "modelgate"
# Regions one tenant may hold at once (each holds an open file).
MAX_REGIONS: Final = 64
# Counts bytes passed through shared memory, by direction ("input" or "output").
ByteCounter = Callable[[str, int], None]


@dataclass(frozen=True, slots=True)
class RegionStatus:
    """One registered region as status answers it."""

    name: str
    key: str
    offset: int
    byte_size: int


REGION: Final = "shared_memory_region"
BYTE_SIZE: Final = "shared_memory_byte_size"
OFFSET: Final = "shared_memory_offset"


def memory_ref(what: str, region: object, byte_size: object, offset: object) -> MemoryRef:
    """The MemoryRef a tensor's parameters give (``what`` names the tensor in errors):
    a region name, a byte size and an optional offset, each checked for its type."""
    if not isinstance(region, str) or not region:
        raise InvalidRequestError(f"{what}: {REGION} must be a region name")
    return MemoryRef(region, _count(what, OFFSET, 0 if offset is None else offset),
                     _count(what, BYTE_SIZE, byte_size))


def _count(what: str, key: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidRequestError(f"{what}: {key} must be a non-negative integer")
    return value


class _Region:
    __slots__ = ("fd", "status")

    def __init__(self, status: RegionStatus, fd: int) -> None:
        self.status = status
        self.fd = fd


class SharedMemory:
    """The regions of every tenant of one serving process, by tenant id and region name.
    A tenant sees and uses only its own. Reads and writes go through the open file
    (pread/pwrite), never a mapping: a client that shrinks the object under a region gets
    a short read refused, not a server killed by SIGBUS."""

    def __init__(self, max_bytes: int, count: ByteCounter | None = None) -> None:
        self._regions: dict[str, dict[str, _Region]] = {}
        self._views: dict[str, TenantMemory] = {}
        self.max_bytes = max_bytes  # a request's bytes read, or one tensor's written
        self._count = count

    def register(self, tenant: str, name: str, key: str, offset: int, byte_size: int) -> None:
        """Open ``key`` under /dev/shm as region ``name`` of ``tenant``."""
        check_name("shared memory region", name)
        regions = self._regions.setdefault(tenant, {})
        if name in regions:
            raise InvalidRequestError(
                f"shared memory region '{name}' is already registered; unregister it first")
        if len(regions) >= MAX_REGIONS:
            raise SharedMemoryLimitError(
                f"a tenant may register at most {MAX_REGIONS} shared memory regions")
        filename = _filename(key)
        if offset < 0 or byte_size <= 0:
            raise InvalidRequestError(
                f"shared memory region '{name}': offset must be >= 0 and byte_size > 0")
        for owner, held in self._regions.items():
            # By file name: "/x" and "x" are the same object.
            if owner != tenant and any(_filename(r.status.key) == filename
                                       for r in held.values()):
                # Another tenant's object: the same answer as for one that does not exist.
                raise SharedMemoryNotFoundError(f"no shared memory object '{echoed(key, 64)}'")
        fd = _open(key, filename)
        try:
            size = os.fstat(fd).st_size
            if offset + byte_size > size:
                raise InvalidRequestError(
                    f"shared memory region '{name}': offset {offset} + byte_size {byte_size} "
                    f"runs past the end of '{echoed(key, 64)}' ({size} bytes)")
        except BaseException:
            os.close(fd)
            raise
        regions[name] = _Region(RegionStatus(name, key, offset, byte_size), fd)

    def unregister(self, tenant: str, name: str = "") -> None:
        """Close region ``name`` of ``tenant`` (every region of it when ``name`` is empty);
        a name not registered is already gone, as in Triton."""
        if name:
            check_name("shared memory region", name)
        regions = self._regions.get(tenant, {})
        for region_name in [name] if name else list(regions):
            region = regions.pop(region_name, None)
            if region is not None:
                os.close(region.fd)

    def status(self, tenant: str, name: str = "") -> list[RegionStatus]:
        """The status of region ``name`` (every region when empty) of ``tenant``."""
        regions = self._regions.get(tenant, {})
        if name:
            return [self._region(tenant, name).status]
        return [r.status for r in regions.values()]

    def read(self, tenant: str, ref: MemoryRef) -> bytearray:
        """The bytes ``ref`` names, checked against its region."""
        region = self._checked(tenant, ref)
        data = bytearray(ref.byte_size)
        got = os.preadv(region.fd, [data], region.status.offset + ref.offset)
        if got != ref.byte_size:
            raise InvalidRequestError(
                f"shared memory region '{ref.region}' holds {got} of the {ref.byte_size} "
                "bytes asked for (the object shrank)")
        if self._count is not None:
            self._count("input", got)
        return data

    def write(self, tenant: str, ref: MemoryRef, data: bytes) -> None:
        """Write ``data`` where ``ref`` says; it must fit the byte_size ``ref`` gives."""
        if len(data) > ref.byte_size:
            raise InvalidRequestError(
                f"the output needs {len(data)} bytes but shared memory region "
                f"'{ref.region}' was given {ref.byte_size}")
        region = self._checked(tenant, ref)
        written = os.pwrite(region.fd, data, region.status.offset + ref.offset)
        if self._count is not None:
            self._count("output", written)

    def check(self, tenant: str, ref: MemoryRef) -> None:
        """Raise unless ``ref`` lies within a region of ``tenant``."""
        self._checked(tenant, ref)

    def of(self, tenant: str) -> TenantMemory:
        """The regions of ``tenant`` alone, as the adapters use them."""
        view = self._views.get(tenant)
        if view is None:
            view = self._views[tenant] = TenantMemory(self, tenant)
        return view

    def close(self) -> None:
        for tenant in list(self._regions):
            self.unregister(tenant)

    def _checked(self, tenant: str, ref: MemoryRef) -> _Region:
        region = self._region(tenant, ref.region)
        size = region.status.byte_size
        if ref.offset < 0 or ref.byte_size < 0 or ref.offset + ref.byte_size > size:
            raise InvalidRequestError(
                f"offset {ref.offset} and byte_size {ref.byte_size} lie outside shared "
                f"memory region '{ref.region}' ({size} bytes)")
        if ref.byte_size > self.max_bytes:
            raise PayloadTooLargeError(
                f"a tensor in shared memory may take at most max_message_bytes "
                f"({self.max_bytes} bytes), not {ref.byte_size}")
        return region

    def _region(self, tenant: str, name: str) -> _Region:
        region = self._regions.get(tenant, {}).get(name)
        if region is None:
            raise SharedMemoryNotFoundError(
                f"no shared memory region '{echoed(name, 64)}' is registered")
        return region


def _filename(key: str) -> str:
    match = _KEY.fullmatch(key)
    if match is None or ".." in key:
        raise InvalidRequestError(
            f"shared memory key '{echoed(key, 64)}' must name an object directly under "
            f"{SHM_ROOT} (letters, digits, '_', '.', '-', optionally after one '/')")
    filename = match.group(1)
    if filename.startswith(RESERVED_PREFIX):
        raise SharedMemoryNotFoundError(f"no shared memory object '{echoed(key, 64)}'")
    return filename


def _open(key: str, filename: str) -> int:
    try:
        # No symlink is followed, and only a regular file is kept: /dev/shm is all it reaches.
        fd = os.open(os.path.join(SHM_ROOT, filename),
                     os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise SharedMemoryNotFoundError(f"no shared memory object '{echoed(key, 64)}'") from None
    except OSError as exc:
        raise InvalidRequestError(
            f"cannot open shared memory object '{echoed(key, 64)}': {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidRequestError(f"shared memory object '{echoed(key, 64)}' is not a file")
    return fd


@dataclass(frozen=True, slots=True)
class TenantMemory:
    """One tenant's view of the shared memory: its own regions, nothing else."""

    memory: SharedMemory
    tenant: str

    def read(self, ref: MemoryRef) -> bytearray:
        return self.memory.read(self.tenant, ref)

    def check_reads(self, refs: Iterable[MemoryRef]) -> None:
        """Refuse a request whose inputs in shared memory add up to more than one message
        may hold, before any is read (each is read into memory of its own)."""
        total = sum(ref.byte_size for ref in refs)
        if total > self.memory.max_bytes:
            raise PayloadTooLargeError(
                f"the request's inputs in shared memory take {total} bytes, more than "
                f"max_message_bytes ({self.memory.max_bytes})")

    def check(self, ref: MemoryRef) -> None:
        self.memory.check(self.tenant, ref)

    def write(self, ref: MemoryRef, data: bytes) -> None:
        self.memory.write(self.tenant, ref, data)


def write_outputs(
    memory: TenantMemory, regions: Mapping[str, MemoryRef], outputs: Mapping[str, Tensor],
    datatypes: Mapping[str, DataType],
) -> dict[str, MemoryRef]:
    """Write each output asked for in shared memory to its place, raw (row-major; BYTES
    with length prefixes); returns where each went, with the bytes it took."""
    written: dict[str, MemoryRef] = {}
    for name, ref in regions.items():
        array = outputs.get(name)
        if array is None:
            continue
        data = to_raw(datatypes[name], array)
        memory.write(ref, data)
        written[name] = MemoryRef(ref.region, ref.offset, len(data))
    return written
