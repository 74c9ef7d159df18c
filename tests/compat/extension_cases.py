"""The compatibility suite's refusals of the classification extension
(protocol/extension_classification): a class count on an output that is not numeric, and a
count that is not positive. test_tritonclient_calls.py runs them against modelgate only:
tritonserver (2.x in .triton-venv) dies on a class count for a BYTES output (the
connection drops and every later call is refused), and answers a negative count over
REST with 500."""

from __future__ import annotations

from types import ModuleType
from typing import Any, Final

from tests.compat.calls import HTTP, Build, Case, _add_inputs, _all_types

INVALID: Final = {"grpc": "StatusCode.INVALID_ARGUMENT", "http": "400"}


def _classified(count: int, model: str = "add", output: str = "y") -> Build:
    """Infer ``model`` asking ``output`` as its top ``count`` classes."""
    def build(module: ModuleType, kind: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if model == "all_types":
            args, _ = _all_types(binary=True)(module, kind)
        else:
            args = (model, _add_inputs(module, kind))
        requested = (module.InferRequestedOutput(output, binary_data=True, class_count=count)
                     if kind in HTTP else module.InferRequestedOutput(output, class_count=count))
        return args, {"outputs": [requested]}
    return build


CLASSIFICATION_REFUSALS: Final[list[Case]] = [
    Case("classification-bytes-output", "infer", _classified(1, "all_types", "out_BYTES"),
         error=True, status=INVALID, why="Triton: the server process dies"),
    Case("classification-negative-count", "infer", _classified(-2), error=True,
         status=INVALID, why="Triton: INVALID_ARGUMENT on gRPC, 500 over REST"),
]
