"""The REST endpoints: each decodes its request, calls the pipeline, the catalog or model
control (the same ones gRPC calls), and encodes the V2 JSON answer. Errors are raised as
the domain's exceptions; gateway/http/edge.py answers them through the status table."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from gateway.errors import InvalidRequestError, ModelNotFoundError
from gateway.http.content_coding import inflate
from gateway.http.extension_endpoints import ExtensionEndpoints
from gateway.http.header_plans import MAX_HEADER_BYTES, HeaderPlans
from gateway.http.infer_body import (
    BINARY_TYPE,
    HEADER_LENGTH,
    InferBody,
    decode_infer,
    encode_infer,
    header_end,
    parse_header,
)
from gateway.http.memory_endpoints import SharedMemoryEndpoints
from gateway.http.messages import HttpRequest, HttpResponse, json_object, json_response
from gateway.http.routes import Route
from gateway.models.model_control import ModelControl
from gateway.monitoring.endpoint import DriftEndpoint, encode, window_of
from gateway.observability.statistics import Duration, StatisticsSnapshot, record_encoding
from gateway.pipeline.catalog import NOT_SERVED, Catalog, server_info
from gateway.pipeline.classification import output_types
from gateway.pipeline.pipeline import InferencePipeline
from gateway.pipeline.server_settings import ServerSettings
from gateway.pipeline.shared_memory import SharedMemory, TenantMemory, write_outputs
from gateway.request.context import RequestContext
from gateway.request.decoded import DecodedRequest
from gateway.request.headers import request_metadata
from model_store.config import config_document

# A caller's deadline in milliseconds from arrival (the REST twin of gRPC's deadline).
TIMEOUT_HEADER: Final = "x-request-timeout-ms"

Endpoint = Callable[[Route, HttpRequest, RequestContext], Awaitable[HttpResponse]]


@dataclass(frozen=True, slots=True)
class _Control:
    """A load/unload request in the shape ModelControl checks (it refuses parameters)."""

    model_name: str
    parameters: Mapping[str, object] = field(default_factory=dict)
    repository_name: str = ""


class RestService:
    """The endpoints by gRPC method name; ``max_body_bytes`` caps an inflated body."""

    def __init__(
        self, pipeline: InferencePipeline, catalog: Catalog, control: ModelControl,
        server_ready: Callable[[], bool], max_body_bytes: int, *, settings: ServerSettings,
        memory: SharedMemory, drift: DriftEndpoint | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._memory = memory
        self._catalog = catalog
        self._control = control
        self._server_ready = server_ready
        self._max_body = max_body_bytes
        self._plans = HeaderPlans()
        self._drift = drift
        info = server_info()
        self._metadata = json.dumps({
            "name": info.name, "version": info.version, "extensions": list(info.extensions),
        }).encode()
        extensions = ExtensionEndpoints(settings)
        # Answered before (and without) authentication: probes carry no key.
        self.anonymous: dict[str, Callable[[], HttpResponse]] = {
            "ServerLive": self.server_live, "ServerReady": self.server_ready,
        }
        self.endpoints: dict[str, Endpoint] = {
            "ServerMetadata": self.server_metadata, "ModelMetadata": self.model_metadata,
            "ModelReady": self.model_ready, "ModelConfig": self.model_config,
            "ModelStatistics": self.model_statistics, "ModelInfer": self.model_infer,
            "RepositoryIndex": self.repository_index,
            "RepositoryModelLoad": self.model_load, "RepositoryModelUnload": self.model_unload,
            "ModelDrift": self.model_drift,
            "TraceSetting": extensions.trace_setting, "LogSettings": extensions.log_settings,
        }
        regions = SharedMemoryEndpoints(memory)
        self.endpoints.update({
            "SystemSharedMemoryStatus": regions.status,
            "SystemSharedMemoryRegister": regions.register,
            "SystemSharedMemoryUnregister": regions.unregister,
        })
        # Triton's extensions not served answer 501 naming the extension.
        self.endpoints.update({f"{prefix}{action}": extensions.not_served
                               for prefix in NOT_SERVED
                               for action in ("Status", "Register", "Unregister")})
        self.endpoints.update({name: extensions.not_served
                               for name in ("ModelGenerate", "ModelGenerateStream")})

    def server_live(self) -> HttpResponse:
        return json_response(200, {"live": True})

    def server_ready(self) -> HttpResponse:
        ready = self._server_ready()
        return json_response(200 if ready else 503, {"ready": ready})

    async def server_metadata(self, route: Route, request: HttpRequest,
                              context: RequestContext) -> HttpResponse:
        return HttpResponse(200, self._metadata)

    async def model_metadata(self, route: Route, request: HttpRequest,
                             context: RequestContext) -> HttpResponse:
        info = self._catalog.metadata(context.tenant, route.model, route.version)
        return json_response(200, {
            "name": info.name, "versions": list(info.versions), "platform": info.platform,
            "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                       for t in info.inputs],
            "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                        for t in info.outputs],
        })

    async def model_ready(self, route: Route, request: HttpRequest,
                          context: RequestContext) -> HttpResponse:
        # As on gRPC an unknown model is simply not ready; the reason says why.
        readiness = self._catalog.readiness(context.tenant, route.model, route.version)
        body: dict[str, Any] = {"name": route.model, "ready": readiness.ready}
        if not readiness.ready:
            body["error"] = readiness.reason or "not ready"
        return json_response(200 if readiness.ready else 503, body)

    async def model_config(self, route: Route, request: HttpRequest,
                           context: RequestContext) -> HttpResponse:
        spec = self._catalog.config(context.tenant, route.model, route.version)
        return json_response(200, config_document(spec.config))

    async def model_statistics(self, route: Route, request: HttpRequest,
                               context: RequestContext) -> HttpResponse:
        snapshots = self._catalog.statistics(context.tenant, route.model, route.version)
        return json_response(200, {"model_stats": [_statistics(s) for s in snapshots]})

    async def model_drift(self, route: Route, request: HttpRequest,
                          context: RequestContext) -> HttpResponse:
        """The drift report of the versions of the model this tenant may see (the metrics
        port's JSON; this process's samples only, where the metrics port of a supervisor
        merges its workers')."""
        # Unknown or invisible: 404, the same message as for every other model route.
        info = self._catalog.metadata(context.tenant, route.model, "")
        visible = {int(v) for v in info.versions}
        number: int | None = None
        if route.version:
            if not route.version.isdigit() or len(route.version) > 18:
                raise InvalidRequestError("a drift report names its version by number")
            number = int(route.version)
            if number not in visible:
                raise ModelNotFoundError(
                    f"model '{route.model}' has no version {number} for this caller"
                )
        if self._drift is None:
            raise ModelNotFoundError("drift monitoring is not served here")
        drift = self._drift
        # A report merges windows of every feature; kept off the event loop.
        status, body = await asyncio.to_thread(
            drift.report, route.model, number, window_of(request.query), visible
        )
        return HttpResponse(status, encode(body))

    async def repository_index(self, route: Route, request: HttpRequest,
                               context: RequestContext) -> HttpResponse:
        ready = json_object(request.body).get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidRequestError("'ready' must be true or false")
        entries = self._catalog.index(context.tenant, "", ready)
        return json_response(200, [
            {k: v for k, v in (("name", e.name), ("version", e.version), ("state", e.state),
                               ("reason", e.reason)) if v}
            for e in entries
        ])

    async def model_load(self, route: Route, request: HttpRequest,
                         context: RequestContext) -> HttpResponse:
        await self._control.load(context.tenant, self._control_request(route, request))
        return json_response(200, {})

    async def model_unload(self, route: Route, request: HttpRequest,
                           context: RequestContext) -> HttpResponse:
        await self._control.unload(context.tenant, self._control_request(route, request))
        return json_response(200, {})

    @staticmethod
    def _control_request(route: Route, request: HttpRequest) -> _Control:
        parameters = json_object(request.body).get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidRequestError("'parameters' must be a JSON object")
        return _Control(route.model, parameters)

    async def model_infer(self, route: Route, request: HttpRequest,
                          context: RequestContext) -> HttpResponse:
        headers = request.headers
        context.label, context.routing_key, context.trace_headers = request_metadata(
            headers.items()
        )
        timeout = headers.get(TIMEOUT_HEADER)
        if timeout is not None:
            context.deadline = time.monotonic() + _milliseconds(timeout) / 1000
        coding = headers.get("content-encoding")
        body = request.body if coding is None else inflate(request.body, coding, self._max_body)
        header_length = headers.get(HEADER_LENGTH)
        binary_start = header_end(body, header_length)
        # A binary request's header seen before is not parsed again (header_plans.py).
        key = (body[:binary_start]
               if header_length is not None and binary_start <= MAX_HEADER_BYTES else b"")
        plan = self._plans.get(key) if key else None
        memory = self._memory.of(context.tenant.id)
        if plan is not None and plan.binary_size == len(body) - binary_start:
            decoded = plan.decode(memoryview(body)[binary_start:])
            answer = plan.body
        else:
            view = memoryview(body)
            header = parse_header(view[:binary_start] if header_length is not None else body)
            decoded, answer = self._decode(header, view, body, binary_start, key,
                                           memory=memory)
        inference = await self._pipeline.infer(context, route.model, route.version, decoded)
        started = time.perf_counter_ns()
        served = inference.version
        options = inference.options
        if options is None:
            payload, head_length = encode_infer(
                served.spec, served.id.version, inference.outputs, answer)
        else:
            types = output_types(served.spec, options.classes)
            written = write_outputs(memory, options.regions, inference.outputs, types)
            payload, head_length = encode_infer(
                served.spec, served.id.version, inference.outputs, answer, types,
                written=written)
        record_encoding(served.statistics, started)
        if head_length is None:
            return HttpResponse(200, payload)
        return HttpResponse(200, payload, BINARY_TYPE,
                            (("Inference-Header-Content-Length", str(head_length)),))

    def _decode(self, header: Mapping[str, Any], view: memoryview, body: bytes,
                binary_start: int, key: bytes, *,
                memory: TenantMemory) -> tuple[DecodedRequest, InferBody]:
        """The full decode of a request whose header has no plan (learning one for it)."""
        try:
            decoded, answer, layout = decode_infer(header, body, binary_start, memory)
        except InvalidRequestError:
            # orjson turned an integer past 64 bits into a float: the standard library's
            # parse names what is wrong exactly (or raises the same).
            decode_infer(parse_header(view[:binary_start], exact=True), body, binary_start,
                         memory)
            raise
        if decoded.invalid is not None:
            exact, exact_answer, _ = decode_infer(
                parse_header(view[:binary_start], exact=True), body, binary_start, memory)
            if exact.invalid is not None:
                return exact, exact_answer
        elif key and layout is not None:
            self._plans.learn(key, layout, decoded, answer)
        return decoded, answer


def _milliseconds(text: str) -> int:
    value = text.strip()
    if not value.isdigit() or len(value) > 10:
        raise InvalidRequestError(f"{TIMEOUT_HEADER} must be a whole number of milliseconds")
    return int(value)


def _statistics(snapshot: StatisticsSnapshot) -> dict[str, Any]:
    """One version's statistics in Triton's JSON (the ModelStatistics message's fields)."""

    def duration(d: Duration) -> dict[str, int]:
        return {"count": d.count, "ns": d.ns}

    return {
        "name": snapshot.model.name,
        "version": str(snapshot.model.version),
        "last_inference": snapshot.last_inference_ms,
        "inference_count": snapshot.inference_count,
        "execution_count": snapshot.execution_count,
        "inference_stats": {
            "success": duration(snapshot.success), "fail": duration(snapshot.fail),
            "queue": duration(snapshot.queue),
            "compute_input": duration(snapshot.compute_input),
            "compute_infer": duration(snapshot.compute_infer),
            "compute_output": duration(snapshot.compute_output),
        },
        "batch_stats": [
            {"batch_size": size, "compute_input": duration(b.compute_input),
             "compute_infer": duration(b.compute_infer),
             "compute_output": duration(b.compute_output)}
            for size, b in snapshot.batches.items()
        ],
    }
