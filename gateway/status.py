"""The one table from exceptions (of every package) to gRPC status codes and HTTP statuses,
used at the edges of the server; anything not in the table is INTERNAL (500), generic."""

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

# Most specific first: the first matching class decides. The HTTP status is what the REST
# port (gateway/http/) answers for the same error.
STATUS_TABLE: Final[tuple[tuple[type[BaseException], grpc.StatusCode, int], ...]] = (
    (gw.UnsupportedCodingError, grpc.StatusCode.INVALID_ARGUMENT, 415),
    (gw.InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT, 400),
    (gw.ModelNotFoundError, grpc.StatusCode.NOT_FOUND, 404),
    (gw.SharedMemoryNotFoundError, grpc.StatusCode.NOT_FOUND, 404),
    (gw.SharedMemoryLimitError, grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (gw.ModelNotReadyError, grpc.StatusCode.UNAVAILABLE, 503),
    (gw.OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (gw.PayloadTooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
    (gw.AuthenticationError, grpc.StatusCode.UNAUTHENTICATED, 401),
    (gw.QuotaUnavailableError, grpc.StatusCode.UNAVAILABLE, 503),
    (gw.RequestTimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    (gw.NotSupportedError, grpc.StatusCode.UNIMPLEMENTED, 501),
    (gw.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED, 403),
    (gw.ModelControlDisabledError, grpc.StatusCode.FAILED_PRECONDITION, 400),
    (store.InvalidModelNameError, grpc.StatusCode.NOT_FOUND, 404),
    (store.InputMismatchError, grpc.StatusCode.INVALID_ARGUMENT, 400),
    (rt.InvalidTensorError, grpc.StatusCode.INVALID_ARGUMENT, 400),
    (rt.RuntimeClosedError, grpc.StatusCode.UNAVAILABLE, 503),
    (rt.ModelLoadError, grpc.StatusCode.UNAVAILABLE, 503),
    (rt.InferenceFailed, grpc.StatusCode.INTERNAL, 500),
    (rt.UpstreamUnavailableError, grpc.StatusCode.UNAVAILABLE, 503),
    (rt.UpstreamBusyError, grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
)

# An upstream's own gRPC status, relayed as it came, in HTTP terms.
HTTP_OF_CODE: Final[dict[grpc.StatusCode, int]] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


@dataclass(frozen=True, slots=True)
class Status:
    """A status to answer with."""

    code: grpc.StatusCode
    message: str
    trailers: Mapping[str, str]
    http: int = 500


def status_of(exc: BaseException) -> Status:
    """Map an exception to the status the client gets. Unknown exceptions are logged with
    their traceback and answered INTERNAL without internals."""
    if isinstance(exc, rt.UpstreamError):
        # An upstream's status comes back as it was sent (NOT_FOUND stays NOT_FOUND).
        upstream_code = getattr(grpc.StatusCode, exc.code, grpc.StatusCode.UNKNOWN)
        return Status(upstream_code, strip_paths(str(exc)), {},
                      HTTP_OF_CODE.get(upstream_code, 500))
    for kind, code, http in STATUS_TABLE:
        if isinstance(exc, kind):
            trailers = exc.trailers if isinstance(exc, gw.GatewayError) else {}
            # Load errors quote file paths (onnxruntime's do); clients get the file name.
            return Status(code, strip_paths(str(exc)), trailers, http)
    log.exception("unexpected error while serving a request", exc_info=exc)
    return Status(grpc.StatusCode.INTERNAL, "internal error", {}, 500)
