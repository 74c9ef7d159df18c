"""OpenTelemetry tracing of the gateway: the tracer provider built at start-up from the
OTEL_* environment and our settings, W3C context extraction from gRPC metadata, and an
export path that never blocks a request and counts every span it drops."""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

from gateway.observability.trace_settings import TraceSettings
from gateway.settings import Settings

log = logging.getLogger(__name__)

SERVICE: Final = "modelgate"
TRACE_ID_KEY: Final = "modelgate-trace-id"
INSTRUMENTATION: Final = "modelgate"

# Span attribute names of our own (the rpc.* ones follow the semantic conventions).
ATTR_MODEL: Final = "modelgate.model.name"
ATTR_VERSION: Final = "modelgate.model.version"
ATTR_TENANT: Final = "modelgate.tenant.id"
ATTR_ROWS: Final = "modelgate.request.rows"
ATTR_BATCH_ROWS: Final = "modelgate.batch.size"
ATTR_BATCH_REQUESTS: Final = "modelgate.batch.requests"
ATTR_QUEUE_US: Final = "modelgate.queue.time_us"
# A start attribute naming the model a request asks for: the sampler reads it to apply the
# model's trace settings and removes it (ATTR_MODEL names only the model that ran).
SAMPLING_MODEL: Final = "modelgate.sampling.model"

DropCounter = Callable[[int, str], None]
Metadata = Sequence[tuple[str, str | bytes]]

# The spec's default for OTEL_BSP_MAX_QUEUE_SIZE.
_DEFAULT_QUEUE: Final = 2048
_SHUTDOWN_S: Final = 5.0


class TracingConfigError(Exception):
    """An OTEL_* variable or tracing setting this gateway cannot honour."""


class _MetadataGetter(Getter[Metadata]):
    """Reads W3C headers from gRPC invocation metadata (lower-case keys, maybe repeated)."""

    def get(self, carrier: Metadata, key: str) -> list[str] | None:
        values = [v if isinstance(v, str) else v.decode("latin-1") for k, v in carrier if k == key]
        return values or None

    def keys(self, carrier: Metadata) -> list[str]:
        return [k for k, _ in carrier]


_GETTER: Final = _MetadataGetter()


class _CountingExporter(SpanExporter):
    """Passes batches to the real exporter and counts those it could not deliver."""

    def __init__(self, inner: SpanExporter, handed: Callable[[int], None], drop: DropCounter):
        self._inner = inner
        self._handed = handed
        self._drop = drop

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self._handed(len(spans))
        try:
            result = self._inner.export(spans)
        except Exception:  # an exporter bug must not kill the export thread
            log.exception("span exporter failed")
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self._drop(len(spans), "export_failed")
        return result

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        # BatchProcessor passes its remaining time when the exporter names this argument.
        if isinstance(self._inner, OTLPSpanExporter):
            self._inner.shutdown(timeout_millis=timeout_millis)
        else:
            self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._inner.force_flush(timeout_millis)


class _DropCountingProcessor(BatchSpanProcessor):
    """The SDK's batch processor (export on its own thread; ``on_end`` only appends to a
    bounded queue), plus a count of spans pushed out of that queue when it is full."""

    def __init__(self, exporter: SpanExporter, max_queue_size: int, drop: DropCounter):
        self._capacity = max_queue_size
        self._pending = 0
        self._lock = threading.Lock()
        self._drop = drop
        counting = _CountingExporter(exporter, self._handed, drop)
        super().__init__(counting, max_queue_size=max_queue_size)

    def _handed(self, count: int) -> None:
        with self._lock:
            self._pending = max(0, self._pending - count)

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if context is None or not context.trace_flags.sampled:
            return
        with self._lock:
            full = self._pending >= self._capacity
            if not full:
                self._pending += 1
        if full:  # the queue is a bounded deque: appending drops its oldest span
            self._drop(1, "queue_full")
        super().on_end(span)


# Request metadata that carries a caller's trace context: such a request takes the full path.
_CONTEXT_KEYS: Final = frozenset({"traceparent", "tracestate", "baggage"})


class _ChosenIds(RandomIdGenerator):
    """Random ids, except a trace id the gateway drew itself to ask the sampler about a
    root span before making it: the span then gets the very id that was sampled."""

    def __init__(self) -> None:
        self._chosen = threading.local()

    def choose(self, trace_id: int) -> None:
        self._chosen.trace_id = trace_id

    def generate_trace_id(self) -> int:
        trace_id: int = getattr(self._chosen, "trace_id", 0)
        if trace_id:
            self._chosen.trace_id = 0
            return trace_id
        return super().generate_trace_id()


class _ModelRatio(Sampler):
    """A root span's decision by the ratio the trace settings give its model (the span's
    start attribute SAMPLING_MODEL; none: the global ratio)."""

    def __init__(self, settings: TraceSettings) -> None:
        self._settings = settings

    def should_sample(  # noqa: PLR0917 (the SDK's signature)
        self, parent_context: Context | None, trace_id: int, name: str,
        kind: SpanKind | None = None, attributes: Attributes = None,
        links: Sequence[Link] | None = None, trace_state: Any = None,
    ) -> SamplingResult:
        bound = self._settings.bound(_model_of(attributes)) or 0
        if trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < bound:
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
        return SamplingResult(Decision.DROP)

    def get_description(self) -> str:
        return "ModelRatio"


class _SettingsSampler(Sampler):
    """The provider's sampler: parent-based on the trace settings' ratio where one is set
    (for the span's model, else globally), else the start-up sampler (OTEL_TRACES_SAMPLER,
    by default parent-based always-on)."""

    def __init__(self, settings: TraceSettings, fallback: Sampler) -> None:
        self._settings = settings
        self._fallback = fallback
        self._ratio = ParentBased(_ModelRatio(settings))

    def should_sample(  # noqa: PLR0917 (the SDK's signature)
        self, parent_context: Context | None, trace_id: int, name: str,
        kind: SpanKind | None = None, attributes: Attributes = None,
        links: Sequence[Link] | None = None, trace_state: Any = None,
    ) -> SamplingResult:
        chosen = (self._fallback if self._settings.bound(_model_of(attributes)) is None
                  else self._ratio)
        result = chosen.should_sample(parent_context, trace_id, name, kind, attributes, links,
                                      trace_state)
        if result.attributes and SAMPLING_MODEL in result.attributes:
            kept = {k: v for k, v in result.attributes.items() if k != SAMPLING_MODEL}
            return SamplingResult(result.decision, kept, result.trace_state)
        return result

    def get_description(self) -> str:
        return f"TraceSettings{{else {self._fallback.get_description()}}}"


def _model_of(attributes: Attributes) -> str | None:
    model = attributes.get(SAMPLING_MODEL) if attributes else None
    return model if isinstance(model, str) and model else None


class Tracing:
    """One gateway's tracer provider and propagator. Not installed as the global provider:
    several gateways (tests) may live in one process with different settings."""

    def __init__(self, provider: TracerProvider, processor: _DropCountingProcessor,
                 ids: _ChosenIds, settings: TraceSettings, fallback: Sampler) -> None:
        self.provider = provider
        self._processor = processor
        self._ids = ids
        # Where the settings give a ratio, a root span's decision is the ratio's
        # comparison, made here without the SDK's calls; else the start-up sampler is asked.
        self.settings = settings
        self._fallback = fallback
        self.tracer: trace.Tracer = provider.get_tracer(INSTRUMENTATION)
        self.propagator = CompositePropagator(
            [TraceContextTextMapPropagator(), W3CBaggagePropagator()]
        )

    def sampled_out_root(self, metadata: Metadata, name: str,
                         model: str | None = None) -> str | None:
        """For a request that brings no trace context, the sampler's decision made before
        any span exists: its trace id (32 hex digits) when the request is sampled out, so
        that it needs no span, context or OTel call at all (what 1 % sampling should cost);
        None when a span must be made (the next root span then gets the id asked about,
        and must be started with ``model`` as its SAMPLING_MODEL attribute)."""
        if any(key in _CONTEXT_KEYS for key, _ in metadata):
            return None
        trace_id = random.getrandbits(128) or 1  # the SDK's own generator, never invalid
        bound = self.settings.bound(model)
        if bound is not None:
            recorded = trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < bound
        else:
            result = self._fallback.should_sample(Context(), trace_id, name)
            recorded = result.decision is not Decision.DROP
        if recorded:
            self._ids.choose(trace_id)
            return None
        return f"{trace_id:032x}"

    def extract(self, metadata: Metadata | None) -> Context:
        """The caller's trace context (traceparent, tracestate, baggage), or an empty one."""
        return self.propagator.extract(metadata or (), getter=_GETTER)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Export every ended span now (blocking; for tests and shutdown)."""
        return self._processor.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Flush what can be flushed within a bounded time, then stop the export thread.
        Blocking: call it off the event loop."""
        # BatchSpanProcessor.shutdown waits up to 30 s on a down collector; do not.
        worker = threading.Thread(target=self._processor.shutdown, daemon=True)
        worker.start()
        worker.join(_SHUTDOWN_S)


def trace_id_hex(span: trace.Span) -> str:
    """The span's trace id as 32 hex digits ('' for an invalid span)."""
    context = span.get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else ""


def _wanted(settings: Settings, environ: Mapping[str, str]) -> str | None:
    """Which exporter to run ('otlp' or 'console'), or None for tracing off. Off unless an
    endpoint or exporter is configured, so an unconfigured gateway pays nothing."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return None
    if exporter and exporter not in ("otlp", "console"):
        raise TracingConfigError(
            f"OTEL_TRACES_EXPORTER={exporter!r}: modelgate supports otlp, console or none"
        )
    endpoint = (
        settings.otlp_endpoint
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    if exporter == "console":
        return "console"
    return "otlp" if endpoint or exporter == "otlp" else None


def _protocol_check(environ: Mapping[str, str]) -> None:
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = environ.get(name, "").strip().lower()
        if value:
            if value != "grpc":
                raise TracingConfigError(
                    f"{name}={value!r}: modelgate exports OTLP over gRPC only (use grpc)"
                )
            return


def start_ratio(settings: Settings) -> float | None:
    """The global sampling ratio at start-up; None lets the SDK's OTEL_TRACES_SAMPLER /
    OTEL_TRACES_SAMPLER_ARG sampler decide (default: parentbased_always_on)."""
    return None if settings.trace_sampling_ratio < 0 else settings.trace_sampling_ratio


def _resource() -> Resource:
    # Resource.create reads OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME.
    resource = Resource.create()
    name = str(resource.attributes.get(SERVICE_NAME, ""))
    if not name or name.startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: SERVICE}))
    return resource


def _queue_size(environ: Mapping[str, str]) -> int:
    raw = environ.get("OTEL_BSP_MAX_QUEUE_SIZE", "")
    try:
        size = int(raw) if raw else _DEFAULT_QUEUE
    except ValueError:
        raise TracingConfigError(f"OTEL_BSP_MAX_QUEUE_SIZE={raw!r}: expected an integer") from None
    return size if size > 0 else _DEFAULT_QUEUE


def build_tracing(
    settings: Settings, drop: DropCounter, environ: Mapping[str, str] | None = None
) -> Tracing | None:
    """Tracing as configured, or None when off. Reads the OTEL_* environment now (at
    start-up), through the SDK's own mechanisms where it has them."""
    env = os.environ if environ is None else environ
    kind = _wanted(settings, env)
    if kind is None:
        return None
    _protocol_check(env)
    exporter: SpanExporter
    if kind == "console":
        exporter = ConsoleSpanExporter()
    else:
        endpoint = settings.otlp_endpoint or None
        if endpoint is not None and "://" not in endpoint:
            endpoint = "http://" + endpoint  # a bare host:port means a plaintext collector
        # The exporter reads OTEL_EXPORTER_OTLP_[TRACES_]{ENDPOINT,HEADERS,TIMEOUT,...}.
        exporter = OTLPSpanExporter(endpoint=endpoint)
    ids, trace_settings = _ChosenIds(), TraceSettings(start_ratio(settings))
    # A provider built without a sampler reads OTEL_TRACES_SAMPLER: the start-up sampler.
    fallback = TracerProvider(shutdown_on_exit=False).sampler
    provider = TracerProvider(sampler=_SettingsSampler(trace_settings, fallback),
                              resource=_resource(), id_generator=ids)
    processor = _DropCountingProcessor(exporter, _queue_size(env), drop)
    provider.add_span_processor(processor)
    log.info(
        "tracing on: %s exporter, sampler %s", kind, provider.sampler.get_description()
    )
    return Tracing(provider, processor, ids, trace_settings, fallback)


def set_attributes(span: trace.Span, attributes: Iterable[tuple[str, Any]]) -> None:
    """Set attributes only on a recording span (skips work for sampled-out requests)."""
    if span.is_recording():
        for key, value in attributes:
            if value is not None:
                span.set_attribute(key, value)
