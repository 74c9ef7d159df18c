"""One completed inference as the pipeline hands it back: the version that ran, the request
as checked, the outputs. Generic in the version, whose type lives in a higher wing (models)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from gateway.request.decoded import OutputOptions
from runtimes.base import InferRequest, Tensor

# The served version's type: gateway.models.served.ServedVersion wherever a pipeline ran it.
# A type parameter rather than a Protocol because its readers (adapters, drift monitoring)
# need the whole version (its spec, statistics, identity as a key), all above this wing.
V = TypeVar("V")


@dataclass(slots=True)
class Inference(Generic[V]):
    """One completed inference: the version that ran (its spec is what an adapter encodes
    the answer with), the request as checked against that version's spec, the outputs it
    produced (classified where the request asked) and what the request asked of them."""

    version: V
    request: InferRequest
    outputs: dict[str, Tensor]
    options: OutputOptions | None = None
