"""Decode plans of binary infer requests, keyed by the exact bytes of their JSON header: a
client sending tensors of one layout sends the same header every time, so a header that was
fully decoded once is not parsed again; only its tensors' bytes are viewed. No model's spec
is involved: the pipeline checks the request's layout against the version that runs it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np

from gateway.errors import InvalidRequestError
from gateway.http.infer_body import BinaryLayout, InferBody
from gateway.pipeline.tensors import from_raw
from gateway.request.decoded import DecodedRequest
from model_store.datatypes import DataType
from runtimes.base import InferRequest, Tensor

# Headers longer than this are parsed every time (real ones are a few hundred bytes).
MAX_HEADER_BYTES: Final = 4096
# Distinct headers remembered; when full the table starts over (a bound against hostile
# variety, e.g. a fresh request id in every header, which then just parses each time).
MAX_PLANS: Final = 1024


@dataclass(frozen=True, slots=True)
class _Input:
    name: str
    datatype: DataType
    dtype: np.dtype[np.generic]
    shape: tuple[int, ...]
    start: int  # offsets into the binary data after the header
    end: int


class HeaderPlan:
    """What the full decode found in one header: the inputs' layout in the binary data, the
    request's own tensor layout (which the pipeline checks against a spec), the requested
    outputs, what they ask (classification) and parameters."""

    __slots__ = ("_inputs", "_layout", "_options", "_priority", "_size", "_timeout_us", "body")

    def __init__(self, inputs: tuple[_Input, ...], decoded: DecodedRequest,
                 body: InferBody) -> None:
        self._inputs = inputs
        self._size = max((i.end for i in inputs), default=0)
        self._layout = decoded.layout
        self._options = decoded.options
        self._priority = decoded.request.priority
        self._timeout_us = decoded.request.timeout_us
        self.body = body

    @property
    def binary_size(self) -> int:
        """The bytes of tensor data the header claims (they must follow it exactly)."""
        return self._size

    def decode(self, data: memoryview) -> DecodedRequest:
        """The request's tensors from ``data`` (the bytes after the header, already checked
        to be binary_size long)."""
        arrays: dict[str, Tensor] = {}
        for item in self._inputs:
            if item.datatype is DataType.BYTES:  # lengths inside: parsed every time
                try:
                    arrays[item.name] = from_raw(item.name, item.datatype, item.shape,
                                                 data[item.start:item.end])
                except InvalidRequestError as exc:  # answered after the spec check
                    return DecodedRequest(InferRequest({}, self._layout.outputs),
                                          self._layout, exc, self._options)
            else:
                # Zero-copy view of the request's bytes; read-only, which runtimes respect.
                arrays[item.name] = np.frombuffer(
                    data[item.start:item.end], dtype=item.dtype
                ).reshape(item.shape)
        return DecodedRequest(
            InferRequest(arrays, self._layout.outputs, 1, self._priority, self._timeout_us),
            self._layout, None, self._options,
        )


class HeaderPlans:
    """The plans of the headers seen, by header bytes."""

    __slots__ = ("_plans",)

    def __init__(self) -> None:
        self._plans: dict[bytes, HeaderPlan] = {}

    def get(self, header: bytes) -> HeaderPlan | None:
        return self._plans.get(header)

    def learn(self, header: bytes, layout: BinaryLayout, decoded: DecodedRequest,
              body: InferBody) -> None:
        """Remember a header whose request decoded without error; ``layout`` gives each
        input's datatype, shape and place in the binary data after the header."""
        options = decoded.options
        if (len(header) > MAX_HEADER_BYTES or decoded.invalid is not None
                or (options is not None and options.regions)):
            return  # outputs to shared memory: checked against the caller's regions each time
        inputs = decoded.request.inputs
        planned = tuple(
            _Input(name, datatype, inputs[name].dtype, shape, start, end)
            for name, (datatype, shape, start, end) in layout.items()
        )
        if len(self._plans) >= MAX_PLANS:
            self._plans.clear()
        self._plans[header] = HeaderPlan(planned, decoded, body)
