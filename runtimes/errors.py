"""The runtimes' exception hierarchy, free of gRPC; third-party errors (onnxruntime,
tritonclient) are translated into these where they are caught."""

from __future__ import annotations


class RuntimeFailure(Exception):
    """Base of every error raised by a runtime."""


class ModelLoadError(RuntimeFailure):
    """The model could not be loaded or warmed up; it never takes traffic."""


class InferenceFailed(RuntimeFailure):
    """The runtime failed while executing a request or batch that was valid."""


class InvalidTensorError(RuntimeFailure):
    """A tensor the runtime cannot take although it matched the declared signature (for
    example BYTES that are not UTF-8 for an ONNX string input)."""


class RuntimeClosedError(RuntimeFailure):
    """The runtime is unloading or unloaded and takes no new work."""


class UpstreamError(RuntimeFailure):
    """A remote upstream (Triton) answered a request with a gRPC status. ``code`` is the
    status name exactly as the upstream sent it (``NOT_FOUND``, ``UNAVAILABLE``...), so the
    gateway can answer with the same status instead of a generic failure."""

    def __init__(self, code: str, message: str, upstream: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.upstream = upstream


class UpstreamUnavailableError(RuntimeFailure):
    """No upstream can take the request: every one is down or lacks the model ready."""


class UpstreamBusyError(RuntimeFailure):
    """Every healthy upstream is at its max in-flight limit."""
