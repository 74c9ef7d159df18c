"""Builds a valid ModelInferRequest for any served model from its ModelMetadata: random data
of the declared datatypes and shapes, with a chosen batch size. Shared by the load tools."""

from __future__ import annotations

import ipaddress
import math
import struct

import grpc
import numpy as np

from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc

_NUMPY = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}


class NotLoopbackError(ValueError):
    """Load tools only ever send traffic to this machine."""


def require_loopback(target: str) -> str:
    """Return ``target`` (host:port) if its host is a loopback address, else raise."""
    host = target.rsplit(":", 1)[0].strip("[]") if ":" in target else target
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise NotLoopbackError(
                f"{target}: load tests and benchmarks only target loopback addresses"
            )
    return target


def request_for(
    metadata: pb.ModelMetadataResponse, batch: int = 1, version: str = "", seed: int = 0
) -> pb.ModelInferRequest:
    """A raw-contents request for every input: -1 dimensions become ``batch`` (first) or 1."""
    rng = np.random.default_rng(seed)
    request = pb.ModelInferRequest(model_name=metadata.name, model_version=version)
    for tensor in metadata.inputs:
        shape = [
            (batch if axis == 0 else 1) if d < 0 else d for axis, d in enumerate(tensor.shape)
        ]
        request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
        request.raw_input_contents.append(_random_raw(tensor.datatype, shape, rng))
    return request


def answered_request(target: str, model: str) -> pb.ModelInferRequest:
    """A one-row request for ``model`` at ``target``, answered once without error before any
    load (h2load cannot tell a gRPC error from an answer)."""
    require_loopback(target)
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=30)
        request = request_for(meta, batch=1)
        stub.ModelInfer(request, timeout=30)
    return request


def _random_raw(datatype: str, shape: list[int], rng: np.random.Generator) -> bytes:
    count = math.prod(shape)
    if datatype == "BYTES":
        words = [b"setosa", b"versicolor", b"virginica", b"rose"]
        return b"".join(
            struct.pack("<I", len(w)) + w for w in (words[i % 4] for i in range(count))
        )
    if datatype == "BF16":
        return rng.integers(0, 2**16, count, dtype=np.uint16).tobytes()
    dtype = np.dtype(_NUMPY[datatype])
    if dtype.kind == "f":
        return rng.random(count).astype(dtype).tobytes()
    if dtype.kind == "b":
        return rng.integers(0, 2, count).astype(dtype).tobytes()
    return rng.integers(0, 100, count).astype(dtype).tobytes()
