"""The gRPC adapter of the inference service (Triton's GRPCInferenceService): each RPC
decodes, calls the pipeline or the catalog, and encodes. Errors are the edge's to map."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.errors import InvalidRequestError, NotSupportedError
from gateway.models.model_control import ModelControl
from gateway.observability.log_settings import Value
from gateway.observability.statistics import Duration, StatisticsSnapshot, record_encoding
from gateway.pipeline.catalog import Catalog, IndexEntry, not_served, server_info
from gateway.pipeline.pipeline import InferencePipeline
from gateway.pipeline.server_settings import ServerSettings
from gateway.pipeline.shared_memory import SharedMemory
from gateway.request.headers import request_metadata
from gateway.sanitize import strip_paths
from gateway.wire.call import caller_of
from gateway.wire.codec import Codecs
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc
from modelgate_pb import model_config_pb2 as mc

# The servicer's context is the edge's CallContext (gateway/wire/call.py) for every guarded
# method, the grpc.aio context for the anonymous ones (ServerLive, ServerReady).
Context = Any

REASON_KEY = "modelgate-reason"

# ModelStreamInfer is served by gateway/wire/stream.py's bytes handler, which the server
# registers in place of this class's method.
IMPLEMENTED = frozenset({
    "ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata",
    "ModelInfer", "ModelStreamInfer", "ModelConfig", "RepositoryIndex", "RepositoryModelLoad",
    "RepositoryModelUnload", "ModelStatistics", "TraceSetting", "LogSettings",
    "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
})


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Triton/KServe V2 inference service. Methods outside IMPLEMENTED answer UNIMPLEMENTED."""

    def __init__(
        self, pipeline: InferencePipeline, catalog: Catalog, control: ModelControl,
        server_ready: Callable[[], bool], settings: ServerSettings, *, memory: SharedMemory,
    ) -> None:
        self._pipeline = pipeline
        self._memory = memory
        self._catalog = catalog
        self._control = control
        self._server_ready = server_ready
        self._settings = settings
        self._codecs = Codecs()
        info = server_info()
        self._metadata = pb.ServerMetadataResponse(
            name=info.name, version=info.version, extensions=info.extensions)

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> Any:
        return pb.ServerReadyResponse(ready=self._server_ready())

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> Any:
        return self._metadata

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> Any:
        # An unknown model is simply not ready; the reason travels in trailing metadata.
        readiness = self._catalog.readiness(caller_of(context).tenant, request.name,
                                            request.version)
        if readiness.reason:
            context.set_trailing_metadata(((REASON_KEY, _ascii(readiness.reason)),))
        return pb.ModelReadyResponse(ready=readiness.ready)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> Any:
        info = self._catalog.metadata(caller_of(context).tenant, request.name, request.version)
        response = pb.ModelMetadataResponse(
            name=info.name, versions=info.versions, platform=info.platform
        )
        for tensor in info.inputs:
            response.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        for tensor in info.outputs:
            response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        return response

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> Any:
        spec = self._catalog.config(caller_of(context).tenant, request.name, request.version)
        return pb.ModelConfigResponse(config=mc.ModelConfig.FromString(spec.config))

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> Any:
        entries = self._catalog.index(caller_of(context).tenant, request.repository_name,
                                      request.ready)
        return pb.RepositoryIndexResponse(models=[_index_message(e) for e in entries])

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> Any:
        snapshots = self._catalog.statistics(caller_of(context).tenant, request.name,
                                             request.version)
        return pb.ModelStatisticsResponse(model_stats=[_statistics_message(s) for s in snapshots])

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> Any:
        caller = caller_of(context)
        caller.label, caller.routing_key, caller.trace_headers = request_metadata(
            context.invocation_metadata()
        )
        remaining = context.time_remaining()
        if remaining is not None:
            caller.deadline = time.monotonic() + remaining
        codecs = self._codecs
        memory = self._memory.of(caller.tenant.id)
        inference = await self._pipeline.infer(
            caller, request.model_name, request.model_version, codecs.decode(request, memory)
        )
        started = time.perf_counter_ns()
        answer = codecs.encode(request, inference, memory)
        record_encoding(inference.version.statistics, started)
        return answer

    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Context
    ) -> Any:
        self._memory.register(caller_of(context).tenant.id, request.name, request.key,
                              request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Context
    ) -> Any:
        self._memory.unregister(caller_of(context).tenant.id, request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Context
    ) -> Any:
        response = pb.SystemSharedMemoryStatusResponse()
        for region in self._memory.status(caller_of(context).tenant.id, request.name):
            response.regions[region.name].CopyFrom(
                pb.SystemSharedMemoryStatusResponse.RegionStatus(
                    name=region.name, key=region.key, offset=region.offset,
                    byte_size=region.byte_size))
        return response

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> Any:
        await self._control.load(caller_of(context).tenant, request)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> Any:
        await self._control.unload(caller_of(context).tenant, request)
        return pb.RepositoryModelUnloadResponse()


    async def TraceSetting(self, request: pb.TraceSettingRequest, context: Context) -> Any:
        # A setting sent with no values clears it (tritonclient sends None that way).
        changes = {name: list(value.value) for name, value in request.settings.items()}
        report = self._settings.trace(caller_of(context).tenant, request.model_name, changes)
        response = pb.TraceSettingResponse()
        for name, values in report.items():
            response.settings[name].value.extend(values)
        return response

    async def LogSettings(self, request: pb.LogSettingsRequest, context: Context) -> Any:
        changes = {name: _log_value(name, value) for name, value in request.settings.items()}
        report = self._settings.logging(caller_of(context).tenant, changes)
        response = pb.LogSettingsResponse()
        for name, setting in report.items():
            entry = response.settings[name]
            if isinstance(setting, bool):
                entry.bool_param = setting
            elif isinstance(setting, int):
                entry.uint32_param = setting
            else:
                entry.string_param = setting
        return response


def _log_value(name: str, value: pb.LogSettingsRequest.SettingValue) -> Value:
    kind = value.WhichOneof("parameter_choice")
    if kind is None:
        raise InvalidRequestError(f"log setting '{name[:64]}' has no value")
    chosen: Value = getattr(value, kind)
    return chosen


def add_inference_service(servicer: InferenceServicer, server: Any) -> None:
    """Register the service's handlers on ``server`` (the edge, which wraps them)."""
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)


def _statistics_message(snapshot: StatisticsSnapshot) -> pb.ModelStatistics:
    def duration(d: Duration) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=d.count, ns=d.ns)

    return pb.ModelStatistics(
        name=snapshot.model.name,
        version=str(snapshot.model.version),
        last_inference=snapshot.last_inference_ms,
        inference_count=snapshot.inference_count,
        execution_count=snapshot.execution_count,
        inference_stats=pb.InferStatistics(
            success=duration(snapshot.success),
            fail=duration(snapshot.fail),
            queue=duration(snapshot.queue),
            compute_input=duration(snapshot.compute_input),
            compute_infer=duration(snapshot.compute_infer),
            compute_output=duration(snapshot.compute_output),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=duration(b.compute_input),
                compute_infer=duration(b.compute_infer),
                compute_output=duration(b.compute_output),
            )
            for size, b in snapshot.batches.items()
        ],
    )


def _index_message(entry: IndexEntry) -> pb.RepositoryIndexResponse.ModelIndex:
    return pb.RepositoryIndexResponse.ModelIndex(
        name=entry.name, version=entry.version, state=entry.state, reason=entry.reason
    )


def _ascii(text: str) -> str:
    # Metadata values must be printable ASCII.
    return strip_paths(text).encode("ascii", "backslashreplace").decode("ascii")[:1024]


def _unimplemented(name: str) -> Callable[..., Awaitable[Any]]:
    message = not_served(name)

    async def method(self: InferenceServicer, request: Any, context: Context) -> Any:
        raise NotSupportedError(message)

    method.__name__ = name
    return method


for _name in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name:
    if _name not in IMPLEMENTED:
        setattr(InferenceServicer, _name, _unimplemented(_name))
