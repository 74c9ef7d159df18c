"""The one table from exceptions (of every package) to gRPC status codes, used at the edge
of the server; anything not in the table is INTERNAL with a generic message."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import grpc

from gateway import errors as gw
from gateway.sanitize import strip_paths
from model_store import errors as store
from runtimes import errors as rt

log = logging.getLogger(__name__)

# Most specific first: the first matching class decides.
STATUS_TABLE: Final[tuple[tuple[type[BaseException], grpc.StatusCode], ...]] = (
    (gw.InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (gw.ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (gw.ModelNotReadyError, grpc.StatusCode.UNAVAILABLE),
    (gw.OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (gw.AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (gw.QuotaUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (gw.RequestTimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (gw.NotSupportedError, grpc.StatusCode.UNIMPLEMENTED),
    (gw.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (gw.ModelControlDisabledError, grpc.StatusCode.FAILED_PRECONDITION),
    (store.InvalidModelNameError, grpc.StatusCode.NOT_FOUND),
    (store.InputMismatchError, grpc.StatusCode.INVALID_ARGUMENT),
    (rt.InvalidTensorError, grpc.StatusCode.INVALID_ARGUMENT),
    (rt.RuntimeClosedError, grpc.StatusCode.UNAVAILABLE),
    (rt.ModelLoadError, grpc.StatusCode.UNAVAILABLE),
    (rt.InferenceFailed, grpc.StatusCode.INTERNAL),
    (rt.UpstreamUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (rt.UpstreamBusyError, grpc.StatusCode.RESOURCE_EXHAUSTED),
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
    if isinstance(exc, rt.UpstreamError):
        # An upstream's status comes back as it was sent (NOT_FOUND stays NOT_FOUND).
        upstream_code = getattr(grpc.StatusCode, exc.code, grpc.StatusCode.UNKNOWN)
        return Status(upstream_code, strip_paths(str(exc)), {})
    for kind, code in STATUS_TABLE:
        if isinstance(exc, kind):
            trailers = exc.trailers if isinstance(exc, gw.GatewayError) else {}
            # Load errors quote file paths (onnxruntime's do); clients get the file name.
            return Status(code, strip_paths(str(exc)), trailers)
    log.exception("unexpected error while serving a request", exc_info=exc)
    return Status(grpc.StatusCode.INTERNAL, "internal error", {})
