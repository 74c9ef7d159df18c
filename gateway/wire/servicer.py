"""The inference service: Triton's GRPCInferenceService over the model manager. Each RPC
checks, resolves, runs, and maps failures through the status table."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import Any, NoReturn, TypeVar

import grpc

from gateway.errors import ModelNotReadyError
from gateway.models.manager import ModelManager, ServedModel, VersionState
from gateway.models.model_control import ModelControl
from gateway.models.routing import request_metadata, requested_target
from gateway.observability import observe
from gateway.observability.statistics import Duration, StatisticsSnapshot, statistics_of
from gateway.quota.store import NO_ADMISSION, LocalQuotaStore, QuotaStore
from gateway.sanitize import strip_paths
from gateway.status import status_of
from gateway.tenancy.auth import current_tenant, visible_version
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc
from modelgate_pb import model_config_pb2 as mc
from runtimes.base import TRACE_HEADERS_TAG

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
Req = TypeVar("Req")
Resp = TypeVar("Resp")

# Triton extension names this server implements (answered by ServerMetadata).
EXTENSIONS = (
    "model_configuration", "model_repository", "binary_tensor_data", "parameters",
    "statistics", "schedule_policy",
)
REASON_KEY = "modelgate-reason"

IMPLEMENTED = frozenset({
    "ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata",
    "ModelInfer", "ModelConfig", "RepositoryIndex", "RepositoryModelLoad",
    "RepositoryModelUnload", "ModelStatistics",
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

    def __init__(
        self,
        manager: ModelManager,
        control: ModelControl | None = None,
        quota: QuotaStore | None = None,
    ) -> None:
        self._manager = manager
        self._quota = quota or LocalQuotaStore()
        self._control = control or ModelControl(manager, enabled=False)
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
            version = visible_version(request.name, request.version)
            served = self._manager.version(request.name, version)
        except Exception as exc:
            context.set_trailing_metadata(((REASON_KEY, _ascii(str(exc))),))
            return pb.ModelReadyResponse(ready=False)
        if served.state is not VersionState.READY and served.reason:
            context.set_trailing_metadata(((REASON_KEY, _ascii(served.reason)),))
        # A remote (Triton) version is ready only while an upstream has it ready.
        runtime = served.runtime
        ready = served.state is VersionState.READY and (runtime is None or runtime.ready())
        return pb.ModelReadyResponse(ready=ready)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> Any:
        try:
            visible_version(request.name, request.version)
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
            versions=[
                str(v) for v in current_tenant().visible_versions(
                    model.name, sorted(model.versions)
                )
            ],
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
            visible_version(request.name, request.version)
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
        tenant = current_tenant()
        for model in self._manager.models():
            if not tenant.can_see(model.name):
                continue  # another tenant's model: not even its name is shown
            visible = set(tenant.visible_versions(model.name, list(model.versions)))
            for entry in _index_entries(model):
                if entry.version and int(entry.version) not in visible:
                    continue
                if not request.ready or entry.state == VersionState.READY.value:
                    response.models.append(entry)
        return response

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> Any:
        # Like Triton: every ready version of every model, of one model, or one version.
        try:
            tenant = current_tenant()
            if request.name:
                visible_version(request.name, request.version)
            if request.version:
                versions = [self._manager.version(request.name, request.version)]
            else:
                models = [self._manager.model(request.name)] if request.name else (
                    self._manager.models()
                )
                versions = [
                    v for m in models for _, v in sorted(m.versions.items())
                    if v.state is VersionState.READY
                    and tenant.visible_versions(v.id.name, [v.id.version])
                ]
                if request.name and not versions:
                    self._manager.version(request.name, "")  # raises: no ready version
            for served in versions:
                if served.state is not VersionState.READY:
                    raise ModelNotReadyError(
                        f"model '{served.id.name}' version {served.id.version} is "
                        f"{served.state.value.lower()}"
                    )
        except Exception as exc:
            await abort_with(context, exc)
        response = pb.ModelStatisticsResponse()
        for served in versions:
            statistics = statistics_of(served.runtime)
            if statistics is not None:
                response.model_stats.append(_statistics_message(statistics.snapshot()))
        return response

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> Any:
        try:
            label, key, trace_headers = request_metadata(context.invocation_metadata())
            tenant = current_tenant()
            # A label sent as x-model-label is checked against the tenant like model_version.
            target = requested_target(request.model_version, label)
            version = visible_version(request.model_name, target)
            # The lease keeps a replaced version from unloading under this request.
            with self._manager.acquire(request.model_name, version, key=key) as lease:
                served = lease.version
                observe.set_model(served.id)  # labels metrics, spans and the access log
                codec = served.codec
                infer = codec.decode(request)
                if not infer.priority:  # 0 = the request set none: the tenant's level
                    batching = served.spec.dynamic_batching
                    if batching is not None and batching.priority_levels:
                        infer.priority = tenant.priority_for(batching.priority_levels)
                remaining = context.time_remaining()
                if remaining is not None:
                    infer.deadline = time.monotonic() + remaining
                if trace_headers:  # for remote runtimes (Triton) to send upstream
                    infer.tags[TRACE_HEADERS_TAG] = trace_headers
                scopes = tenant.scopes(request.model_name)
                # Charged before queueing; refunded if rejected before it ran (what
                # QuotaStore.admit does, without an async generator per request).
                with (await self._quota.admission(scopes, infer.rows) if scopes
                      else NO_ADMISSION):
                    outputs = await lease.runtime.infer(infer)
                self._manager.mirror(lease, infer, outputs)
                return codec.encode(request, outputs)
        except Exception as exc:
            await abort_with(context, exc)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> Any:
        try:
            await self._control.load(request)
        except Exception as exc:
            await abort_with(context, exc)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> Any:
        try:
            await self._control.unload(request)
        except Exception as exc:
            await abort_with(context, exc)
        return pb.RepositoryModelUnloadResponse()


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


def _index_entries(model: ServedModel) -> list[pb.RepositoryIndexResponse.ModelIndex]:
    Index = pb.RepositoryIndexResponse.ModelIndex
    if model.error is not None or not model.versions:
        reason = model.error or "no version to serve"
        return [Index(name=model.name, state=VersionState.UNAVAILABLE.value,
                      reason=strip_paths(reason))]
    # Reasons quote load errors, which name files by absolute path: clients get the name.
    return [
        Index(name=model.name, version=str(n), state=v.state.value,
              reason=strip_paths(v.reason))
        for n, v in sorted(model.versions.items())
    ]


def _ascii(text: str) -> str:
    # Metadata values must be printable ASCII.
    return strip_paths(text).encode("ascii", "backslashreplace").decode("ascii")[:1024]


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
