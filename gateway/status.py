"""The one table from exceptions (of every package) to gRPC status codes, used at the edge
of the server; anything not in the table is INTERNAL with a generic message."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import grpc

from gateway import errors as gw
from model_store import errors as store
from runtimes import errors as rt

log = logging.getLogger(__name__)

# Most specific first: the first matching class decides.
STATUS_TABLE: Final[tuple[tuple[type[BaseException], grpc.StatusCode], ...]] = (
    (gw.InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (gw.ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (gw.ModelNotReadyError, grpc.StatusCode.UNAVAILABLE),
    (gw.OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (gw.RequestTimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (gw.NotSupportedError, grpc.StatusCode.UNIMPLEMENTED),
    (store.InvalidModelNameError, grpc.StatusCode.NOT_FOUND),
    (store.InputMismatchError, grpc.StatusCode.INVALID_ARGUMENT),
    (rt.InvalidTensorError, grpc.StatusCode.INVALID_ARGUMENT),
    (rt.RuntimeClosedError, grpc.StatusCode.UNAVAILABLE),
    (rt.ModelLoadError, grpc.StatusCode.UNAVAILABLE),
    (rt.InferenceFailed, grpc.StatusCode.INTERNAL),
)


@dataclass(frozen=True, slots=True)
class Status:
    """A status to answer with."""

    code: grpc.StatusCode
    message: str
    trailers: Mapping[str, str]


def status_of(exc: BaseException) -> Status:
    """Map an exception to the status the client gets. Unknown exceptions are logged with
    their traceback and answered INTERNAL without internals."""
    for kind, code in STATUS_TABLE:
        if isinstance(exc, kind):
            trailers = exc.trailers if isinstance(exc, gw.GatewayError) else {}
            return Status(code, str(exc), trailers)
    log.exception("unexpected error while serving a request", exc_info=exc)
    return Status(grpc.StatusCode.INTERNAL, "internal error", {})
