"""The model store's exception hierarchy: what can be wrong with a repository or a request's
tensors as measured against a model's declared signature. Free of gRPC."""

from __future__ import annotations


class StoreError(Exception):
    """Base of every error raised by model_store."""


class InvalidModelNameError(StoreError):
    """A model name that could never name a folder of the store."""


class ModelConfigError(StoreError):
    """A config.pbtxt (or ONNX graph it was derived from) that cannot be served."""


class InputMismatchError(StoreError):
    """A request tensor that does not match the model's declared input or output."""
