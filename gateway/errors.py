"""The gateway's exception hierarchy, free of gRPC; gateway/status.py maps these (and the
other packages' errors) to status codes in one table."""

from __future__ import annotations

from collections.abc import Mapping

from gateway.sanitize import echoed

# Trailing metadata of rejections, part of the client contract: when to retry, and which
# tenant limit was hit (absent for overload that is no tenant's limit).
RETRY_AFTER_KEY = "retry-after-ms"
LIMIT_KEY = "modelgate-limit"


class GatewayError(Exception):
    """Base of every error raised by the gateway package. ``trailers`` travel back to the
    client as trailing metadata (retry hints, reasons)."""

    def __init__(self, message: str, trailers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.trailers: Mapping[str, str] = trailers or {}


class InvalidRequestError(GatewayError):
    """The request itself is malformed: tensors, parameters, names."""


class UnsupportedCodingError(InvalidRequestError):
    """A request body in a content coding the server does not decode (HTTP 415)."""


class ModelNotFoundError(GatewayError):
    """No such model or version (or one the caller may not see)."""


class SharedMemoryNotFoundError(GatewayError):
    """No such shared-memory region or object for this caller (another tenant's reads the
    same)."""


class SharedMemoryLimitError(GatewayError):
    """A tenant's shared-memory regions are at their bound."""


class ModelNotReadyError(GatewayError):
    """The version exists but is loading, unloading or failed to load."""


class OverloadedError(GatewayError):
    """A queue or limit is full; the trailers say when to retry."""


class PayloadTooLargeError(GatewayError):
    """The request's body (or what it inflates to) is over the size limit."""


class RequestTimeoutError(GatewayError):
    """The request's deadline or queue timeout passed before it ran."""


class NotSupportedError(GatewayError):
    """A feature of the protocol this gateway does not offer."""


class AuthenticationError(GatewayError):
    """Missing, unknown, revoked or expired API key, or a client certificate that does not
    match the tenant; the message never says which tenants or keys exist."""


class QuotaExceededError(OverloadedError):
    """A tenant's limit is reached; the trailers name the limit and when to retry."""


class QuotaUnavailableError(GatewayError):
    """The shared quota store cannot be reached and the gateway is set to fail closed."""


class PermissionDeniedError(GatewayError):
    """The caller is authenticated but may not do this (model control needs an admin)."""


class ModelControlDisabledError(GatewayError):
    """The repository API's load/unload is off (start with --enable-model-control)."""


def unknown_model(name: str) -> ModelNotFoundError:
    """The one NOT_FOUND for a model that does not exist and for one the caller may not see:
    both must read alike, so a tenant learns nothing of other tenants' models."""
    return ModelNotFoundError(f"unknown model '{echoed(name)}'")


def limit_of(error: BaseException | None) -> str | None:
    """The ``modelgate-limit`` trailer ``error`` carries: the limit that refused it (None
    when it names none, as overload that is no tenant's limit)."""
    return error.trailers.get(LIMIT_KEY) if isinstance(error, GatewayError) else None
