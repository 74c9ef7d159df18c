"""A recording stand-in for a Triton upstream (grpc.aio on a loopback port): it answers
ServerReady, ModelReady and ModelInfer and records, per ModelInfer, the deadline left and the
metadata that arrived, which a real Triton server does not show."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc


@dataclass
class Received:
    """What one ModelInfer call brought: seconds left of its deadline, its metadata."""

    time_remaining: float | None
    metadata: dict[str, str]
    request: pb.ModelInferRequest


@dataclass
class RecordingUpstream(pb_grpc.GRPCInferenceServiceServicer):
    """Echoes every raw input back as the output of the same position (named by the
    request's requested outputs, else ``out<N>``)."""

    received: list[Received] = field(default_factory=list)
    port: int = 0

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the recorder keeps no metadata")

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> Any:
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.received.append(Received(context.time_remaining(), metadata, request))
        response = pb.ModelInferResponse(model_name=request.model_name)
        names = [o.name for o in request.outputs] or [
            f"out{i}" for i in range(len(request.inputs))
        ]
        for name, tensor, raw in zip(names, request.inputs, request.raw_input_contents,
                                     strict=False):
            response.outputs.add(name=name, datatype=tensor.datatype, shape=tensor.shape)
            response.raw_output_contents.append(raw)
        return response


@contextlib.asynccontextmanager
async def recording_upstream(
    tls: tuple[bytes, bytes, bytes] | None = None,
) -> AsyncIterator[RecordingUpstream]:
    """A RecordingUpstream serving on 127.0.0.1 (a free port) in the running loop; with
    ``tls`` (certificate, key, client CA: PEM) it takes only TLS clients with a certificate."""
    server = grpc.aio.server()
    recorder = RecordingUpstream()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(recorder, server)
    if tls is None:
        recorder.port = server.add_insecure_port("127.0.0.1:0")
    else:
        cert, key, client_ca = tls
        credentials = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca, require_client_auth=True
        )
        recorder.port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield recorder
    finally:
        await server.stop(0)
