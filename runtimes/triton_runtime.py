"""The Triton runtime: a Runtime that forwards each request (or batch) to a model on remote
Triton Inference Servers over gRPC, balancing over the upstreams of an UpstreamPool."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Final

import grpc
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from model_store.spec import ModelId, ModelSpec
from modelgate_pb import grpc_service_pb2 as pb
from runtimes.base import (
    InferRequest,
    Runtime,
    RuntimeMetadata,
    Tensor,
)
from runtimes.errors import (
    InferenceFailed,
    InvalidTensorError,
    ModelLoadError,
    RuntimeClosedError,
    UpstreamBusyError,
    UpstreamError,
    UpstreamUnavailableError,
)
from runtimes.triton_wire import build_request, decode_outputs
from runtimes.upstreams import Upstream, UpstreamPool

log = logging.getLogger(__name__)

PLATFORM: Final = "triton"
# config.pbtxt parameters of a model served by Triton upstreams.
PARAM_UPSTREAM: Final = "upstream"
PARAM_REMOTE_MODEL: Final = "remote_model"
PARAM_REMOTE_VERSION: Final = "remote_version"
LATEST: Final = "latest"
_FORWARDED_HEADERS: Final = ("traceparent", "tracestate")
_PROPAGATOR: Final = TraceContextTextMapPropagator()


@dataclass(frozen=True, slots=True)
class TritonRoute:
    """Where one gateway model version is served: the upstreams (by name) and the remote
    model's name and version ('' lets the upstream choose its latest)."""

    upstreams: tuple[str, ...]
    model: str
    version: str

    @classmethod
    def from_spec(cls, spec: ModelSpec, version: int) -> TritonRoute:
        """The route a config.pbtxt declares in its parameters: ``upstream`` (names,
        comma-separated), ``remote_model`` (default: the model's own name) and
        ``remote_version`` (default: the same number as the local version; ``latest``:
        whatever the upstream serves newest)."""
        params = spec.parameters
        names = tuple(n.strip() for n in params.get(PARAM_UPSTREAM, "").split(",") if n.strip())
        if not names:
            raise ModelLoadError(
                f"model '{spec.name}' is served by Triton but its config has no "
                f"'{PARAM_UPSTREAM}' parameter naming the upstream(s)"
            )
        remote_version = params.get(PARAM_REMOTE_VERSION, str(version)).strip()
        if remote_version == LATEST:
            remote_version = ""
        elif remote_version and not remote_version.isdigit():
            raise ModelLoadError(
                f"model '{spec.name}': {PARAM_REMOTE_VERSION} must be a number or '{LATEST}'"
            )
        return cls(names, params.get(PARAM_REMOTE_MODEL, "").strip() or spec.name, remote_version)


def _never_reached(exc: grpc.aio.AioRpcError) -> bool:
    """A connection that could not be made: the request was never sent, so it cannot have
    run. Anything else (a connection dropped mid-call) may have run and is not retried."""
    if exc.code() is not grpc.StatusCode.UNAVAILABLE:
        return False
    details = (exc.details() or "").lower()
    return "failed to connect" in details or "connection refused" in details


class TritonRuntime(Runtime):
    """One model version served by one or more Triton upstreams."""

    def __init__(self, model: ModelId, spec: ModelSpec, route: TritonRoute,
                 pool: UpstreamPool) -> None:
        self.model = model
        self.spec = spec
        self.route = route
        self._pool = pool
        self._datatypes = {t.name: t.datatype for t in spec.inputs}
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._watching = False

    async def load(self) -> None:
        unknown = [n for n in self.route.upstreams if n not in self._pool.configs]
        if unknown:
            raise ModelLoadError(
                f"model '{self.spec.name}' names upstream(s) {', '.join(unknown)} that are not "
                f"declared (declared: {', '.join(sorted(self._pool.configs)) or 'none'})"
            )
        self._pool.watch(self.route.model, self.route.version)
        self._watching = True
        await self._pool.probe()
        if not self.ready():
            # Not a load failure: the upstream may come up later and probes will see it.
            log.warning("model %s: no upstream has %s ready yet", self.model, self._remote())
            return
        await self._check_signature()

    def _remote(self) -> str:
        version = self.route.version or LATEST
        return f"'{self.route.model}' version {version} on {', '.join(self.route.upstreams)}"

    async def _check_signature(self) -> None:
        """A config that does not match the upstream's model fails the load, not every
        request (names and datatypes of the inputs the config declares)."""
        upstream = self._pool.pick(self.route.upstreams, self.route.model, self.route.version)
        try:
            meta = await upstream.stub.ModelMetadata(
                pb.ModelMetadataRequest(name=self.route.model, version=self.route.version),
                timeout=10,
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("model %s: cannot read the upstream's metadata: %s", self.model,
                        exc.details())
            return
        remote = {t.name: t.datatype for t in meta.inputs}
        for tensor in self.spec.inputs:
            if remote.get(tensor.name) != tensor.datatype.value:
                raise ModelLoadError(
                    f"input '{tensor.name}': config says {tensor.datatype.value}, upstream "
                    f"{upstream.name} says {remote.get(tensor.name, 'no such input')}"
                )

    def ready(self) -> bool:
        return not self._closed and self._pool.model_ready(
            self.route.upstreams, self.route.model, self.route.version
        )

    async def infer(self, request: InferRequest) -> dict[str, Tensor]:
        if self._closed:
            raise RuntimeClosedError(f"model {self.model} is not loaded")
        message = build_request(self.route.model, version=self.route.version,
                                inputs=request.inputs, datatypes=self._datatypes,
                                outputs=request.outputs)
        metadata = _trace_metadata(request)
        self._in_flight += 1
        self._idle.clear()
        try:
            upstream = self._pool.pick(self.route.upstreams, self.route.model, self.route.version)
            try:
                response = await self._send(upstream, message, request.deadline, metadata)
            except _NotSent as failed:
                # One retry elsewhere, and only for a request that never left this process.
                try:
                    other = self._pool.pick(self.route.upstreams, self.route.model,
                                            self.route.version, exclude=upstream)
                except (UpstreamUnavailableError, UpstreamBusyError):
                    raise failed.error from failed
                try:
                    response = await self._send(other, message, request.deadline, metadata)
                except _NotSent as again:
                    raise again.error from again
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
        return self._checked(decode_outputs(response), request.outputs)

    def _checked(self, outputs: dict[str, Tensor], wanted: tuple[str, ...]) -> dict[str, Tensor]:
        """The outputs asked for (all declared ones when none was), as declared: an upstream
        whose model differs from the config fails the request instead of answering garbage."""
        result: dict[str, Tensor] = {}
        declared = {t.name: t for t in self.spec.outputs}
        for name in wanted or tuple(declared):
            tensor = declared.get(name)
            if tensor is None:
                raise InvalidTensorError(f"model '{self.spec.name}' has no output '{name}'")
            array = outputs.get(tensor.name)
            if array is None:
                raise InferenceFailed(f"upstream answered without output '{tensor.name}'")
            if array.dtype != tensor.datatype.numpy_dtype:
                raise InferenceFailed(
                    f"upstream output '{tensor.name}' is {array.dtype}, the config declares "
                    f"{tensor.datatype.value}"
                )
            result[tensor.name] = array
        return result

    async def _send(self, upstream: Upstream, message: pb.ModelInferRequest,
                    deadline: float | None, metadata: tuple[tuple[str, str], ...]
                    ) -> pb.ModelInferResponse:
        timeout = _timeout(deadline, upstream.config.timeout_s)
        upstream.outstanding += 1
        try:
            response: pb.ModelInferResponse = await upstream.stub.ModelInfer(
                message, timeout=timeout, metadata=metadata or None
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code is grpc.StatusCode.UNAVAILABLE:
                self._pool.take_out(upstream, exc.details() or "UNAVAILABLE")
            error = UpstreamError(code.name, f"upstream {upstream.name}: {exc.details()}",
                                  upstream.name)
            if _never_reached(exc):
                raise _NotSent(error) from exc
            raise error from exc
        finally:
            upstream.outstanding -= 1
        upstream.completed += 1
        return response

    async def unload(self) -> None:
        self._closed = True
        await self._idle.wait()
        if self._watching:
            self._pool.unwatch(self.route.model, self.route.version)
            self._watching = False

    def metadata(self) -> RuntimeMetadata:
        return RuntimeMetadata(
            model=self.model, platform=PLATFORM,
            device="remote:" + ",".join(self.route.upstreams),
            instances=len(self.route.upstreams),
        )


class _NotSent(Exception):
    """The request could not be sent to an upstream (connection failed): retryable."""

    def __init__(self, error: UpstreamError) -> None:
        super().__init__(str(error))
        self.error = error


def _timeout(deadline: float | None, cap_s: float) -> float | None:
    """Seconds the upstream gets: what is left of the caller's deadline, capped by the
    upstream's own timeout. A deadline already passed is not sent at all."""
    remaining = None if deadline is None else deadline - time.monotonic()
    if remaining is not None and remaining <= 0:
        raise UpstreamError("DEADLINE_EXCEEDED", "deadline passed before the request was "
                            "sent upstream")
    if cap_s > 0:
        return cap_s if remaining is None else min(cap_s, remaining)
    return remaining


def _trace_metadata(request: InferRequest) -> tuple[tuple[str, str], ...]:
    """The trace context to send upstream: the current span's when the gateway traces (the
    upstream's work is then a child of it), else the caller's headers as they came (the
    request's, or its first member's for a merged batch)."""
    carrier: dict[str, str] = {}
    if trace.get_current_span().get_span_context().is_valid:
        _PROPAGATOR.inject(carrier)
    else:
        headers = request.trace_headers
        if headers is None and request.members:
            headers = request.members[0].trace_headers
        if headers is not None:
            carrier = {k: str(v) for k, v in headers.items()}
    return tuple((k, carrier[k]) for k in _FORWARDED_HEADERS if carrier.get(k))
