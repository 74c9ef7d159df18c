"""The gateway's Prometheus registry and metric families (per model version, per tenant,
tracing and Redis health, process), with pre-bound children for the hot path."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from gateway.observability.loop_metrics import Buckets, Count, Level, LoopMetrics
from gateway.quota.store import LIMIT_NAMES
from model_store.spec import ModelId

NAMESPACE: Final = "modelgate"
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

# Seconds, from 50 µs (a tiny CPU model) to 10 s (a large model on a busy GPU): fixed
# buckets so histograms from every replica aggregate.
DURATION_BUCKETS: Final = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)

# Tenants come from the tenants file, but a label must stay bounded whatever happens to it.
MAX_TENANTS: Final = 256
OTHER_TENANT: Final = "_other"
# Bound on the cache of per-answer children (models x tenants x codes seen).
_MAX_ANSWERED: Final = 65536
NO_TENANT: Final = "_anonymous"
# A quota rejection whose limit is none of LIMIT_NAMES (the label set stays fixed).
OTHER_LIMIT: Final = "_other"


@dataclass(frozen=True, slots=True)
class ModelMetrics:
    """One model version's metric children, bound once so a request does no label lookups."""

    inference_count: Count
    exec_count: Count
    queue_duration: Buckets
    compute_duration: Buckets
    batch_size: Buckets
    request_duration: Buckets
    queue_depth: Level
    in_flight: Level


class Metrics:
    """Every metric family of one gateway, in its own registry (tests run several gateways
    in one process)."""

    def __init__(self, process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        if process_metrics:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        r, ns = self.registry, NAMESPACE
        version = ("model", "version")
        # The request path's families: updated on the event loop only, without locks.
        loop = LoopMetrics(r)
        self.requests = loop.counter(
            f"{ns}_inference_requests", "Inference RPCs answered, by model version and gRPC "
            "status code (Triton: nv_inference_request_success / _failure)",
            ("model", "version", "code"),
        )
        self.inference_count = loop.counter(
            f"{ns}_inference_count", "Rows (batch-dimension elements) inferred "
            "(Triton: nv_inference_count)", version,
        )
        self.exec_count = loop.counter(
            f"{ns}_inference_exec_count", "Model executions, one per batch run "
            "(Triton: nv_inference_exec_count)", version,
        )
        self.request_duration = loop.histogram(
            f"{ns}_inference_request_duration_seconds",
            "Inference RPC time from arrival to answer", version, DURATION_BUCKETS,
        )
        self.queue_duration = loop.histogram(
            f"{ns}_inference_queue_duration_seconds",
            "Time a request waited in the batcher queue", version, DURATION_BUCKETS,
        )
        self.compute_duration = loop.histogram(
            f"{ns}_inference_compute_duration_seconds", "Runtime time of the execution that "
            "served a request (observed once per request)", version, DURATION_BUCKETS,
        )
        self.batch_size = loop.histogram(
            f"{ns}_inference_batch_size", "Rows per model execution", version, BATCH_BUCKETS,
        )
        self.queue_depth = loop.gauge(
            f"{ns}_inference_queue_depth", "Requests waiting in the batcher queue "
            "(Triton: nv_inference_pending_request_count)", version,
        )
        self.in_flight = loop.gauge(
            f"{ns}_inference_in_flight", "Requests inside the runtime (queued or executing)",
            version,
        )
        self.protocol_requests = loop.counter(
            f"{ns}_protocol_requests", "Inference requests answered, by transport (grpc, "
            "grpc_stream, http) and gRPC status code (HTTP answers: the code of the same "
            "error)", ("protocol", "code"),
        )
        self.tenant_requests = loop.counter(
            f"{ns}_tenant_requests", "Inference RPCs by tenant and gRPC status code",
            ("tenant", "code"),
        )
        self.quota_rejections = Counter(
            "tenant_quota_rejections", "Requests rejected by the tenant's quota, by tenant "
            "and the limit that refused them", ("tenant", "limit"), namespace=ns, registry=r,
        )
        self.redis_outages = Counter(
            "redis_outages", "Times the shared quota store (Redis) was found unreachable",
            namespace=ns, registry=r,
        )
        self.spans_dropped = Counter(
            "spans_dropped", "Trace spans never delivered to the collector, by reason",
            ("reason",), namespace=ns, registry=r,
        )
        shared_memory = Counter(
            "shared_memory_bytes", "Tensor bytes read from (input) and written to (output) "
            "system shared memory regions", ("direction",), namespace=ns, registry=r,
        )
        self._shared_memory = {d: shared_memory.labels(d) for d in ("input", "output")}
        self._models: dict[ModelId, ModelMetrics] = {}
        # (model, tenant, code, protocol) -> the children one answered RPC counts into, and
        # its version's duration histogram (None when it never resolved).
        self._answered: dict[
            tuple[ModelId | None, str | None, str, str],
            tuple[Count, Count, Count, Buckets | None],
        ] = {}
        self._tenants: set[str] = set()
        self._lock = threading.Lock()

    def count_shared_memory(self, direction: str, size: int) -> None:
        """Count ``size`` tensor bytes passed through shared memory ("input"/"output")."""
        self._shared_memory[direction].inc(size)

    def model(self, model: ModelId) -> ModelMetrics:
        """The bound children of one model version (created on first use)."""
        bound = self._models.get(model)
        if bound is None:
            labels = (model.name, str(model.version))
            bound = ModelMetrics(
                inference_count=self.inference_count.labels(*labels),
                exec_count=self.exec_count.labels(*labels),
                queue_duration=self.queue_duration.labels(*labels),
                compute_duration=self.compute_duration.labels(*labels),
                batch_size=self.batch_size.labels(*labels),
                request_duration=self.request_duration.labels(*labels),
                queue_depth=self.queue_depth.labels(*labels),
                in_flight=self.in_flight.labels(*labels),
            )
            self._models[model] = bound
        return bound

    def tenant_label(self, tenant: str | None) -> str:
        """A bounded label value for ``tenant``: the id itself for the first MAX_TENANTS
        tenants seen, then OTHER_TENANT."""
        if not tenant:
            return NO_TENANT
        if tenant in self._tenants:
            return tenant
        with self._lock:
            if len(self._tenants) >= MAX_TENANTS:
                return OTHER_TENANT
            self._tenants.add(tenant)
        return tenant

    def count_request(
        self, model: ModelId | None, tenant: str | None, code: str, duration_s: float | None,
        protocol: str = "grpc",
    ) -> None:
        """Count one answered inference RPC; ``model`` None when it never resolved (an
        unknown name must not become a label value)."""
        key = (model, tenant, code, protocol)
        children = self._answered.get(key)
        if children is None:
            labels = ("", "") if model is None else (model.name, str(model.version))
            children = (self.requests.labels(*labels, code),
                        self.tenant_requests.labels(self.tenant_label(tenant), code),
                        self.protocol_requests.labels(protocol, code),
                        None if model is None else self.model(model).request_duration)
            if len(self._answered) < _MAX_ANSWERED:
                self._answered[key] = children
        requests, tenants, protocols, durations = children
        requests.inc()
        tenants.inc()
        protocols.inc()
        if durations is not None and duration_s is not None:
            durations.observe(duration_s)

    def count_quota_rejection(self, tenant: str | None, limit: str | None) -> None:
        """Count one quota rejection; ``limit`` is its ``modelgate-limit`` trailer
        (``requests_per_s;model=iris`` counts as ``requests_per_s``)."""
        self.quota_rejections.labels(self.tenant_label(tenant), limit_label(limit)).inc()

    def count_redis_outage(self) -> None:
        self.redis_outages.inc()

    def count_dropped_spans(self, count: int, reason: str) -> None:
        self.spans_dropped.labels(reason).inc(count)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


def limit_label(limit: str | None) -> str:
    """The bounded label of a ``modelgate-limit`` trailer: the limit's name without the
    scope it applies to (a per-model limit counts under its limit's name)."""
    name = (limit or "").partition(";")[0]
    return name if name in LIMIT_NAMES else OTHER_LIMIT
