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
