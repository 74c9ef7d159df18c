"""The gRPC edge's one error mapping, over a real channel: bytes that are not the method's
message, unimplemented methods and domain errors each get the table's status."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from modelgate_pb import grpc_service_pb2 as pb
from tests.support.gateway import RunningGateway, running_gateway

SERVICE = "/inference.GRPCInferenceService"
# Field 1 (model_name) says it is 200 bytes long, then the message ends: not a message.
TRUNCATED = b"\x0a\xc8\x01abc"


@pytest.fixture(scope="module")
def gateway() -> Iterator[RunningGateway]:
    with running_gateway() as running:
        yield running


def _raw(gateway: RunningGateway, method: str, data: bytes) -> grpc.RpcError:
    with grpc.insecure_channel(gateway.target) as channel:
        # No serializers: the bytes go out as they are.
        call = channel.unary_unary(f"{SERVICE}/{method}", request_serializer=None,
                                   response_deserializer=None)
        with pytest.raises(grpc.RpcError) as raised:
            call(data, timeout=10)
    return raised.value


@pytest.mark.parametrize("method", ["ModelInfer", "ModelMetadata", "RepositoryIndex"])
def test_bytes_that_do_not_parse_are_invalid_argument_naming_the_method(
    gateway: RunningGateway, method: str,
) -> None:
    error = _raw(gateway, method, TRUNCATED)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert f"not a valid {method} request" in (error.details() or "")
    # The server is unharmed: the next request is answered.
    assert gateway.stub().ServerLive(pb.ServerLiveRequest(), timeout=10).live


def test_unimplemented_and_unknown_names_come_from_the_table(gateway: RunningGateway) -> None:
    stub = gateway.stub()
    with pytest.raises(grpc.RpcError) as raised:
        stub.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest(), timeout=10)
    assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert ("CudaSharedMemoryStatus (the cuda_shared_memory extension) is not implemented"
            in (raised.value.details() or ""))
    with pytest.raises(grpc.RpcError) as raised:
        stub.RepositoryIndex(pb.RepositoryIndexRequest(repository_name="other"), timeout=10)
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(pb.ModelInferRequest(model_name="no-such-model"), timeout=10)
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    assert "unknown model 'no-such-model'" in (raised.value.details() or "")
