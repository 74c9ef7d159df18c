"""The composition root of one serving process: builds the parts every transport shares
once, then the frontends (gRPC, REST, the metrics port) over them; starts and drains them."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from typing import Any, Final

import grpc
from grpc_health.v1._async import HealthServicer

from gateway.models.backends import RuntimeFactory
from gateway.models.manager import ModelManager, VersionState
from gateway.models.model_control import ModelControl
from gateway.models.reloader import Reloader
from gateway.models.version_metrics import VersionCollector
from gateway.monitoring.collector import DriftCollector
from gateway.monitoring.endpoint import DriftEndpoint
from gateway.monitoring.monitor import Monitor, MonitorConfig
from gateway.observability.access_log import AccessLog
from gateway.observability.dependency_health import DependencyCollector
from gateway.observability.log_settings import LogSettings
from gateway.observability.metrics import Metrics
from gateway.observability.tracing import build_tracing
from gateway.pipeline.catalog import Catalog
from gateway.pipeline.pipeline import InferencePipeline
from gateway.pipeline.server_settings import ServerSettings
from gateway.pipeline.shared_memory import SharedMemory
from gateway.process import collector
from gateway.process.frontend import BindError, Frontend, FrontendFactory, Services, address
from gateway.process.grpc_frontend import GrpcFrontend
from gateway.process.http_endpoints import MetricsFrontend
from gateway.process.rest_frontend import RestFrontend
from gateway.quota.redis_store import build_quota_store
from gateway.request.inflight import InflightLimit
from gateway.settings import Settings, check_exposure, upstream_configs
from gateway.tenancy.auth import Authenticator
from gateway.tenancy.tenants import TenantRegistry
from gateway.wire.stream import StreamInfer
from runtimes.onnx_runtime import OnnxOptions
from runtimes.triton_discovery import StoreWithUpstreams, TritonDiscovery
from runtimes.upstreams import UpstreamPool

log = logging.getLogger(__name__)

# The metrics port closes last, after the models unloaded: its probes answer all through
# the drain. By then nothing is in flight but a scrape.
PROBE_GRACE_S: Final = 2.0


class Gateway:
    """One serving process: the models, the parts every transport shares, the frontends.
    ``frontends`` are more transports, built over the same Services after the built-in ones
    (gRPC, then REST when settings.http_port is set) and started after them."""

    def __init__(self, settings: Settings, worker_index: int | None = None,
                 frontends: Sequence[FrontendFactory] = ()) -> None:
        self.settings = settings
        self.worker_index = worker_index
        self.metrics = Metrics()
        # Reads the OTEL_* environment now, at start-up; None when tracing is off.
        self.tracing = build_tracing(settings, self.metrics.count_dropped_spans)
        self.access_log = AccessLog(settings.access_log) if settings.access_log else None
        self.upstreams = UpstreamPool(
            upstream_configs(settings), settings.triton_probe_interval_s,
            settings.max_message_bytes,
        )
        self.discovery = TritonDiscovery(self.upstreams, settings.triton_refresh_interval_s)
        self.inflight = InflightLimit(settings.max_inflight_requests)
        factory = RuntimeFactory(
            OnnxOptions(
                device=settings.device,
                intra_op_threads=settings.intra_op_threads,
                inter_op_threads=settings.inter_op_threads,
                inline_below_us=settings.inline_compute_us,
            ),
            self.metrics,
            self.tracing,
            upstreams=self.upstreams,
            in_flight=lambda: self.inflight.inflight,
            staged_batches=settings.staged_batches,
        )
        # The store's models plus those export=all Triton upstreams serve.
        self.manager = ModelManager(StoreWithUpstreams(settings.store, self.discovery), factory)
        self.metrics.registry.register(VersionCollector(self.manager))
        # Drift monitoring: a post-inference hook hands samples to a worker thread.
        self.monitor = Monitor(MonitorConfig.from_settings(settings))
        if settings.monitoring:
            self.manager.shadow.observers.append(self.monitor.shadow_observer)
            self.metrics.registry.register(
                DriftCollector(self.monitor, self.manager.models, self.manager.shadow.stats))
        # SettingsError for an open public address or a bad tenants file: exit 2.
        check_exposure(settings)
        self.tenants = TenantRegistry(settings.tenants) if settings.tenants else None
        self.authenticator = Authenticator(self.tenants)
        self.quota = build_quota_store(
            settings.redis_url, settings.redis_failure_mode, self.metrics.count_redis_outage,
            table=settings.quota_table, worker_index=worker_index,
        )
        self.metrics.registry.register(DependencyCollector(self.upstreams, self.quota))
        self.draining = False
        services = Services(
            settings=settings, worker_index=worker_index, metrics=self.metrics,
            tracing=self.tracing, access_log=self.access_log, manager=self.manager,
            # What every transport calls: inference, and what a tenant may learn.
            pipeline=InferencePipeline(self.manager, self.quota, self.monitor.hooks()),
            catalog=Catalog(self.manager), inflight=self.inflight,
            authenticator=self.authenticator,
            control=ModelControl(self.manager, settings.enable_model_control),
            drift=DriftEndpoint(self.monitor, self.manager.models, self.manager.shadow.stats),
            # Triton's system shared memory: each tenant's regions (this process's only).
            shared_memory=SharedMemory(settings.max_message_bytes,
                                       self.metrics.count_shared_memory),
            # Triton's trace and logging extensions, over this process's tracing and root
            # logger.
            server_settings=ServerSettings(
                self.manager, self.tracing.settings if self.tracing is not None else None,
                LogSettings(logging.getLogger())),
            draining=lambda: self.draining,
        )
        self.services = services
        self.grpc = GrpcFrontend(services)
        self.rest = (RestFrontend(services, settings.http_port)
                     if settings.http_port is not None else None)
        # The transports, in start order; each drains within the grace period on SIGTERM.
        self.frontends: list[Frontend] = [
            self.grpc, *([self.rest] if self.rest is not None else []),
            *(build(services) for build in frontends),
        ]
        # The metrics port: the REST port's HTTP stack and limits; no route takes a body.
        self.probes = MetricsFrontend(services)
        self.reloader = (
            Reloader(self.manager, settings.store, settings.poll_interval)
            if settings.poll_interval > 0 else None
        )

    @property
    def port(self) -> int:
        """The gRPC port as bound (0 before start)."""
        return self.grpc.port

    @property
    def rest_port(self) -> int:
        """The REST port as bound (0 before start, or when not served)."""
        return self.rest.port if self.rest is not None else 0

    @property
    def metrics_port(self) -> int:
        return self.probes.port

    @property
    def server(self) -> grpc.aio.Server:
        """The gRPC server (tests/hardening/test_auth_surface.py records what it serves)."""
        return self.grpc.server

    @property
    def health(self) -> HealthServicer:
        return self.grpc.health

    @property
    def streams(self) -> StreamInfer:
        return self.grpc.streams

    @property
    def edge_handlers(self) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
        """The gRPC handlers by full method name, as served (loadtests/hotpath.py calls
        them directly)."""
        return self.grpc.edge_handlers

    async def start(self) -> int:
        """Bind and start serving, then load the models (health and ServerLive answer
        while they load). Returns the bound gRPC port."""
        await self.quota.start()
        if self.tenants is not None:
            self.tenants.start()
        else:
            log.warning("no tenants file: the gateway is open, every caller may use every "
                        "model without a key (local development only)")
        # The quota store starts before any port serves: a stream opened at once charges it
        # (and the shared store's start frees what a previous worker of this index held).
        started: list[Frontend] = []
        try:
            for frontend in (*self.frontends, self.probes):
                await frontend.start()
                started.append(frontend)
        except BindError:
            await asyncio.gather(*(frontend.stop(0) for frontend in started))
            raise
        if self.reloader is not None:
            await self.reloader.snapshot()
        await self.upstreams.start()
        if self.discovery.enabled:
            await self.discovery.refresh()
        self.monitor.start()
        await self.manager.start()
        await self.refresh_health()
        self.manager.add_listener(self.refresh_health)
        self.upstreams.add_listener(self.refresh_health)
        if self.reloader is not None:
            self.reloader.start()
        self.discovery.start(self.manager.reconcile)
        models = self.manager.models()
        ready = sum(
            1 for m in models if any(v.state is VersionState.READY for v in m.versions.values())
        )
        log.info(
            "modelgate serving %d of %d models on %s (store: %s)",
            ready, len(models), address(self.settings.host, self.port), self.settings.store,
        )
        if self.rest is not None:
            log.info("KServe V2 REST on http%s://%s", "s" if self.settings.tls_cert else "",
                     address(self.settings.host, self.rest_port))
        return self.port

    async def refresh_health(self) -> None:
        """Publish overall and per-model health (the gRPC health service)."""
        await self.grpc.refresh_health()

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish within the grace period, unload."""
        self.draining = True
        await self.grpc.enter_graceful_shutdown()
        if self.reloader is not None:
            await self.reloader.stop()
        await self.discovery.stop()
        grace_s = self.settings.grace_period_s if grace is None else grace
        # Every transport drains at once: in-flight requests of each finish within the grace.
        await asyncio.gather(*(frontend.stop(grace_s) for frontend in self.frontends))
        await self.quota.close()
        self.services.shared_memory.close()
        if self.tenants is not None:
            await self.tenants.stop()
        await self.manager.stop()
        self.monitor.stop()
        await self.upstreams.close()
        await self.probes.stop(PROBE_GRACE_S)
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)  # bounded; flushes what it can
        if self.access_log is not None:
            self.access_log.close()


async def serve(
    settings: Settings,
    worker_index: int | None = None,
    started: Callable[[Gateway], None] | None = None,
) -> int:
    """Run until SIGTERM or SIGINT, then drain and return the exit code. ``worker_index`` is
    set in the processes of a multi-worker supervisor; ``started`` is told once serving."""
    gateway = Gateway(settings, worker_index)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await gateway.start()
    collector.settle()  # after the models loaded: what start-up built is frozen
    if started is not None:
        started(gateway)
    await stopping.wait()
    log.info("signal received: draining (grace period %.1fs)", settings.grace_period_s)
    await gateway.stop()
    log.info("stopped")
    return 0
