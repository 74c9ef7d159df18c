"""The inference service: Triton's GRPCInferenceService over the model manager. Each RPC
checks, resolves, runs, and maps failures through the status table."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import Any, NoReturn, TypeVar

import grpc

from gateway.conversion import decode_request, encode_response
from gateway.manager import ModelManager, ServedModel, VersionState
from gateway.status import status_of
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc
from modelgate_pb import model_config_pb2 as mc

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
Req = TypeVar("Req")
Resp = TypeVar("Resp")

# Triton extension names this server implements (answered by ServerMetadata).
EXTENSIONS = ("model_configuration", "model_repository", "binary_tensor_data", "parameters")
REASON_KEY = "modelgate-reason"

IMPLEMENTED = frozenset({
    "ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata",
    "ModelInfer", "ModelConfig", "RepositoryIndex",
})


async def abort_with(context: Context, exc: BaseException) -> NoReturn:
    """Answer the RPC with the status the table gives ``exc``."""
    status = status_of(exc)
    if status.trailers:
        context.set_trailing_metadata(tuple(status.trailers.items()))
    await context.abort(status.code, status.message)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


def _server_version() -> str:
    try:
        return metadata.version("modelgate")
    except metadata.PackageNotFoundError:  # running from a source tree without install
        return "0.0.0"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Triton/KServe V2 inference service. Methods outside IMPLEMENTED answer UNIMPLEMENTED."""

    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager
        self._version = _server_version()

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> Any:
        return pb.ServerReadyResponse(ready=self._manager.ready())

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> Any:
        return pb.ServerMetadataResponse(
            name="modelgate", version=self._version, extensions=EXTENSIONS
        )

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> Any:
        # Like Triton, an unknown model is simply not ready; tritonclient's is_model_ready
        # expects a boolean, not an error. The reason travels in trailing metadata.
        try:
            served = self._manager.version(request.name, request.version)
        except Exception as exc:
            context.set_trailing_metadata(((REASON_KEY, _ascii(str(exc))),))
            return pb.ModelReadyResponse(ready=False)
        if served.state is not VersionState.READY and served.reason:
            context.set_trailing_metadata(((REASON_KEY, _ascii(served.reason)),))
        return pb.ModelReadyResponse(ready=served.state is VersionState.READY)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> Any:
        try:
            model = self._manager.model(request.name)
            if request.version:
                self._manager.version(request.name, request.version)
            spec = model.spec
            if spec is None:
                self._manager.version(request.name, "")  # raises with the model's error
                raise AssertionError("unreachable")  # pragma: no cover
        except Exception as exc:
            await abort_with(context, exc)
        response = pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(v) for v in sorted(model.versions)],
            platform=spec.platform or spec.backend,
        )
        for tensor in spec.inputs:
            response.inputs.add(
                name=tensor.name, datatype=tensor.datatype.value, shape=spec.full_shape(tensor)
            )
        for tensor in spec.outputs:
            response.outputs.add(
                name=tensor.name, datatype=tensor.datatype.value, shape=spec.full_shape(tensor)
            )
        return response

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> Any:
        try:
            model = self._manager.model(request.name)
            if request.version:
                self._manager.version(request.name, request.version)
            if model.spec is None:
                self._manager.version(request.name, "")
                raise AssertionError("unreachable")  # pragma: no cover
        except Exception as exc:
            await abort_with(context, exc)
        config = mc.ModelConfig.FromString(model.spec.config)
        return pb.ModelConfigResponse(config=config)

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> Any:
        if request.repository_name:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                "this server has one model repository; leave repository_name empty",
            )
        response = pb.RepositoryIndexResponse()
        for model in self._manager.models():
            for entry in _index_entries(model):
                if not request.ready or entry.state == VersionState.READY.value:
                    response.models.append(entry)
        return response

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> Any:
        try:
            served, runtime = self._manager.resolve(request.model_name, request.model_version)
            infer = decode_request(request, served.spec)
            remaining = context.time_remaining()
            if remaining is not None:
                infer.deadline = time.monotonic() + remaining
            outputs = await runtime.infer(infer)
            return encode_response(request, served.spec, served.id.version, outputs)
        except Exception as exc:
            await abort_with(context, exc)


def _index_entries(model: ServedModel) -> list[pb.RepositoryIndexResponse.ModelIndex]:
    Index = pb.RepositoryIndexResponse.ModelIndex
    if model.error is not None or not model.versions:
        reason = model.error or "no version to serve"
        return [Index(name=model.name, state=VersionState.UNAVAILABLE.value, reason=reason)]
    return [
        Index(name=model.name, version=str(n), state=v.state.value, reason=v.reason)
        for n, v in sorted(model.versions.items())
    ]


def _ascii(text: str) -> str:
    # Metadata values must be printable ASCII.
    return text.encode("ascii", "backslashreplace").decode("ascii")[:1024]


def _unimplemented(name: str) -> Callable[..., Awaitable[Any]]:
    async def method(self: InferenceServicer, request: Any, context: Context) -> Any:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, f"{name} is not implemented by modelgate"
        )

    method.__name__ = name
    return method


for _name in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name:
    if _name not in IMPLEMENTED:
        setattr(InferenceServicer, _name, _unimplemented(_name))
