"""Compressed gRPC requests (gzip, deflate): gRPC core hands them over still compressed
(its per-message decompression is off, as it inflates a message whole before checking its
size) and this inflates them in bounded steps, refusing one past max_message_bytes."""

from __future__ import annotations

import zlib
from typing import Final, cast

from gateway.errors import InvalidRequestError, PayloadTooLargeError

# Inflated per step: the most held beyond the message itself while it grows.
STEP: Final = 1 << 20
# zlib window bits: a gzip member (grpc-encoding gzip) or a zlib stream (deflate).
_GZIP: Final = 16 + zlib.MAX_WBITS
_ZLIB: Final = zlib.MAX_WBITS
# The first byte of every compressed message (gzip's magic, deflate's zlib header): what a
# caller checks before calling inflated, so a plain message costs one lookup.
COMPRESSED_FIRST_BYTES: Final = frozenset({0x1F, 0x78})


def wbits_of(data: bytes) -> int | None:
    """How ``data`` is compressed, from its first bytes: the gzip magic, or the zlib header
    gRPC's deflate writes (0x78, a 32 KiB window, its check bits). Core takes grpc-encoding
    out of the metadata a handler sees, so the bytes are what tells. No request message of
    the services served starts so: 0x1f is wire type 7, which does not exist, and 0x78 is
    field 15, which none of them has (and known fields are written first)."""
    if len(data) < 2:
        return None
    first, second = data[0], data[1]
    if first == 0x1F and second == 0x8B:
        return _GZIP
    if first == 0x78 and (first << 8 | second) % 31 == 0:
        return _ZLIB
    return None


def inflated(data: bytes, limit: int) -> bytes:
    """``data`` as its message: inflated when compressed, in steps of at most STEP bytes,
    and refused (PayloadTooLargeError) as soon as it passes ``limit``, so a small bomb costs
    at most ``limit`` bytes, never its inflated size."""
    wbits = wbits_of(data)
    if wbits is None:
        return data
    inflater = zlib.decompressobj(wbits)
    message = bytearray()
    pending = data
    try:
        while not inflater.eof:
            part = inflater.decompress(pending, min(STEP, limit - len(message) + 1))
            pending = inflater.unconsumed_tail
            if not part and not pending:
                break  # every byte read and the stream not ended: truncated
            if len(message) + len(part) > limit:
                raise PayloadTooLargeError(
                    f"the compressed request inflates past max_message_bytes ({limit} bytes)"
                )
            message += part
    except zlib.error as exc:
        raise InvalidRequestError(f"the compressed request does not inflate: {exc}") from None
    if not inflater.eof or inflater.unused_data:
        raise InvalidRequestError("the compressed request is truncated or has trailing bytes")
    # Protobuf parses any bytes-like object; a copy into bytes would double the peak.
    return cast(bytes, message)
