"""Content codings of the REST port: gzip and deflate request bodies inflated under a cap
(the output is bounded while inflating, never after), and responses compressed for a
client whose Accept-Encoding asks for it."""

from __future__ import annotations

import zlib
from typing import Final

from gateway.errors import InvalidRequestError, PayloadTooLargeError, UnsupportedCodingError

# zlib's window bits: gzip framing, zlib framing (what HTTP calls deflate).
_WBITS: Final = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
CODINGS: Final = tuple(_WBITS)
# What a request body may be sent in (the Accept-Encoding of a 415 answer, RFC 7694).
REQUEST_CODINGS: Final = ", ".join((*CODINGS, "identity"))
# Inflated in steps of this many bytes, so a bomb is stopped within one step of the cap.
_STEP: Final = 1 << 20
# Fast: responses are small and latency counts more than a few percent of size.
_LEVEL: Final = 1


def inflate(body: bytes, coding: str, limit: int) -> bytes:
    """The decoded body of a request sent with ``Content-Encoding: coding``; a body that
    inflates past ``limit`` bytes is refused once the limit is passed."""
    name = coding.strip().lower()
    if name in ("", "identity"):
        return body
    wbits = _WBITS.get(name)
    if wbits is None:
        raise UnsupportedCodingError(
            f"Content-Encoding '{name[:32]}' is not supported; use one of {REQUEST_CODINGS}"
        )
    inflater = zlib.decompressobj(wbits)
    parts: list[bytes] = []
    size = 0
    pending = body
    try:
        while True:
            part = inflater.decompress(pending, min(_STEP, limit + 1 - size))
            size += len(part)
            if size > limit:
                raise PayloadTooLargeError(
                    f"the request body inflates to more than {limit} bytes"
                )
            parts.append(part)
            pending = inflater.unconsumed_tail
            if inflater.eof or (not pending and not part):
                break
    except zlib.error as exc:
        raise InvalidRequestError(f"the {name} request body is corrupt: {exc}") from exc
    if not inflater.eof:
        raise InvalidRequestError(f"the {name} request body is truncated")
    if inflater.unused_data:
        raise InvalidRequestError(f"the {name} request body has data after its end")
    return b"".join(parts)


def accepted(accept_encoding: str | None) -> str | None:
    """The coding to answer with: gzip or deflate when the client accepts one (q > 0)."""
    if not accept_encoding:
        return None
    offered: dict[str, float] = {}
    for item in accept_encoding.split(","):
        token, _, params = item.partition(";")
        quality = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                quality = float(params[2:])
            except ValueError:
                quality = 0.0
        offered[token.strip().lower()] = quality
    best: str | None = None
    for coding in CODINGS:
        if offered.get(coding, 0.0) > 0 and (best is None or offered[coding] > offered[best]):
            best = coding
    return best


def compress(body: bytes, coding: str) -> bytes:
    """``body`` in ``coding`` (one that accepted() returned)."""
    compressor = zlib.compressobj(_LEVEL, zlib.DEFLATED, _WBITS[coding])
    return compressor.compress(body) + compressor.flush()
