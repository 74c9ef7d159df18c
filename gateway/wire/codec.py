"""The gRPC inference hot path's codec: a request of a layout decoded before is decoded
from a cached plan (no model's spec involved), and a version's answers are written straight
to wire bytes. Everything else goes through gateway/wire/conversion.py, which checks it all."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np

from gateway.errors import InvalidRequestError
from gateway.models.served import ServedVersion
from gateway.pipeline.classification import output_types
from gateway.pipeline.shared_memory import TenantMemory, write_outputs
from gateway.request.decoded import DecodedRequest, RequestLayout
from gateway.request.inference import Inference
from gateway.wire.conversion import (
    MAX_TENSORS,
    decode_request,
    encode_response,
    output_options,
    request_parameters,
    to_raw,
    wants_typed,
)
from model_store.datatypes import DataType
from model_store.spec import ModelSpec
from modelgate_pb import grpc_service_pb2 as pb
from runtimes.base import InferRequest, Tensor

# Decode plans kept for this many distinct request layouts (names, types, shapes, requested
# outputs), whatever model they name: enough for every batch size of real clients, bounded
# against hostile variety (a full table starts over).
MAX_PLANS: Final = 1024
# Per version: the encoder's output metadata kept for this many (output, shape) pairs.
MAX_METAS: Final = 256
MAX_ENCODERS: Final = 256

# (input name, datatype, shape) of every input as sent, then the requested output names.
PlanKey = tuple[tuple[tuple[str, str, tuple[int, ...]], ...], tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class _Input:
    name: str
    dtype: np.dtype[np.generic]
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True, slots=True)
class _Plan:
    """What the full decode concluded about one request layout (no model involved)."""

    layout: RequestLayout
    inputs: tuple[_Input, ...]


class RequestDecoder:
    """Decodes ModelInferRequests into DecodedRequests: a layout decoded in full once is
    decoded again from its plan (each request's bytes still checked)."""

    __slots__ = ("_plans",)

    def __init__(self) -> None:
        self._plans: dict[PlanKey, _Plan] = {}

    def decode(
        self, request: pb.ModelInferRequest, memory: TenantMemory | None = None
    ) -> DecodedRequest:
        """The request as plain tensors; raises (or defers) what decode_request does.
        ``memory``: the caller's shared memory, for tensors that name a region."""
        inputs = request.inputs
        raw = request.raw_input_contents
        requested = request.outputs
        count = len(inputs)
        if (not raw or len(raw) != count or count > MAX_TENSORS
                or len(requested) > MAX_TENSORS):
            return decode_request(request, memory)
        if count == 1:  # the common case, without the generator
            tensor = inputs[0]
            layout: tuple[tuple[str, str, tuple[int, ...]], ...] = (
                (tensor.name, tensor.datatype, tuple(tensor.shape)),
            )
        else:
            layout = tuple([(t.name, t.datatype, tuple(t.shape)) for t in inputs])
        key: PlanKey = (layout, tuple([o.name for o in requested]) if requested else ())
        plan = self._plans.get(key)
        if plan is None:
            decoded = decode_request(request, memory)  # every check; raises on bad input
            self._learn(key, decoded)
            return decoded
        arrays: dict[str, Tensor] = {}
        for index, spec in enumerate(plan.inputs):
            data = raw[index]
            if len(data) != spec.nbytes or inputs[index].HasField("contents"):
                return decode_request(request, memory)  # the full message
            # Zero-copy view of the request's bytes; read-only, which runtimes respect.
            arrays[spec.name] = np.frombuffer(data, dtype=spec.dtype).reshape(spec.shape)
        outputs = plan.layout.outputs
        options = output_options(requested, memory) if requested else None
        params = request.parameters
        if params:
            try:
                priority, timeout_us = request_parameters(params)
            except InvalidRequestError:
                return decode_request(request, memory)  # deferred like any data error
            return DecodedRequest(InferRequest(arrays, outputs, 1, priority, timeout_us),
                                  plan.layout, None, options)
        return DecodedRequest(InferRequest(arrays, outputs), plan.layout, None, options)

    def _learn(self, key: PlanKey, decoded: DecodedRequest) -> None:
        if decoded.invalid is not None:
            return
        planned: list[_Input] = []
        for name, array in decoded.request.inputs.items():
            if array.dtype == object:  # BYTES: every element is parsed every time
                return
            planned.append(_Input(name, array.dtype, array.shape, array.nbytes))
        if len(self._plans) >= MAX_PLANS:
            self._plans.clear()
        self._plans[key] = _Plan(decoded.layout, tuple(planned))


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# Lengths of names, shapes and most outputs fit two bytes: those are looked up.
_SMALL: Final = tuple(_encode_varint(n) for n in range(1 << 14))


def varint(value: int) -> bytes:
    """A protobuf base-128 varint (below 16384 from a table)."""
    return _SMALL[value] if value < 16384 else _encode_varint(value)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(payload)) + payload


class ResponseEncoder:
    """Writes one model version's ModelInferResponse messages with raw outputs as protobuf
    wire bytes: what never changes for the version is encoded once, each output's metadata
    once per shape. Typed contents (binary_data: false) go through conversion.py."""

    __slots__ = ("_dtypes", "_head", "_metas", "_out_heads", "spec", "version")

    # ModelInferResponse fields: 1 model_name, 2 model_version, 3 id, 5 outputs,
    # 6 raw_output_contents; InferOutputTensor: 1 name, 2 datatype, 3 shape (packed).
    def __init__(self, spec: ModelSpec, version: int) -> None:
        self.spec = spec
        self.version = version
        self._head = _length_delimited(1, spec.name.encode()) + _length_delimited(
            2, str(version).encode()
        )
        self._dtypes = {t.name: (t.datatype, t.datatype.numpy_dtype) for t in spec.outputs}
        self._out_heads = {
            t.name: _length_delimited(1, t.name.encode())
            + _length_delimited(2, t.datatype.value.encode())
            for t in spec.outputs
        }
        # (output name, shape) -> the whole encoded outputs entry (field 5).
        self._metas: dict[tuple[str, tuple[int, ...]], bytes] = {}

    def _meta(self, name: str, shape: tuple[int, ...]) -> bytes:
        packed = b"".join(varint(d) for d in shape)
        meta = self._out_heads[name] + (_length_delimited(3, packed) if shape else b"")
        encoded = _length_delimited(5, meta)
        if len(self._metas) < MAX_METAS:
            self._metas[(name, shape)] = encoded
        return encoded

    def encode(
        self, request: pb.ModelInferRequest, outputs: Mapping[str, Tensor]
    ) -> bytes | pb.ModelInferResponse:
        """The answer: wire bytes with raw_output_contents, or a message when the client
        asked for typed contents (binary_data: false)."""
        if request.outputs and wants_typed(request.outputs):
            return encode_response(request, self.spec, self.version, outputs)
        return self.encode_raw(request.id, outputs)

    def encode_raw(self, request_id: str, outputs: Mapping[str, Tensor]) -> bytes:
        parts = [self._head]
        if request_id:
            parts.append(_length_delimited(3, request_id.encode()))
        raws = []
        metas = self._metas
        for name, array in outputs.items():
            shape = array.shape
            parts.append(metas.get((name, shape)) or self._meta(name, shape))
            datatype, dtype = self._dtypes[name]
            if datatype is DataType.BYTES:
                data = to_raw(datatype, array)
            else:
                # tobytes writes row-major whatever the array's strides.
                data = (array if array.dtype == dtype else array.astype(dtype)).tobytes()
            raws.append(b"\x32" + varint(len(data)))  # field 6, length-delimited
            raws.append(data)
        parts += raws
        return b"".join(parts)


class Codecs:
    """The gRPC adapter's codec: one request decoder (its plans know no model) and the
    response encoder of each served version, built on its first answer and kept by
    identity. When the table is full, the encoders of versions that have gone (their
    runtime unloaded) are dropped first."""

    __slots__ = ("_encoders", "_limit", "decoder")

    def __init__(self, limit: int = MAX_ENCODERS) -> None:
        self.decoder = RequestDecoder()
        self._encoders: dict[ServedVersion, ResponseEncoder] = {}
        self._limit = limit

    def decode(
        self, request: pb.ModelInferRequest, memory: TenantMemory | None = None
    ) -> DecodedRequest:
        return self.decoder.decode(request, memory)

    def encode(
        self, request: pb.ModelInferRequest, inference: Inference[ServedVersion],
        memory: TenantMemory | None = None,
    ) -> bytes | pb.ModelInferResponse:
        """The answer to ``request`` from what the pipeline returned; outputs asked for in
        shared memory are written to ``memory`` (the caller's) and only described."""
        options = inference.options
        if options is not None:  # classified or shared-memory outputs: the full encoder
            spec = inference.version.spec
            types = output_types(spec, options.classes)
            written = (write_outputs(memory, options.regions, inference.outputs, types)
                       if options.regions and memory is not None else None)
            return encode_response(request, spec, inference.version.id.version,
                                   inference.outputs, types, written=written)
        return self.of(inference.version).encode(request, inference.outputs)

    def of(self, version: ServedVersion) -> ResponseEncoder:
        encoder = self._encoders.get(version)
        if encoder is None:
            encoder = ResponseEncoder(version.spec, version.id.version)
            if len(self._encoders) >= self._limit:
                self._evict()
            if len(self._encoders) < self._limit:
                self._encoders[version] = encoder
        return encoder

    def _evict(self) -> None:
        gone = [v for v in self._encoders if v.runtime is None]
        for version in gone or list(self._encoders)[: self._limit // 2]:
            del self._encoders[version]
