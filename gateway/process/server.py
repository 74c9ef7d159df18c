"""Wires the gRPC server: the inference service, the standard health service (overall and
per model) and server reflection, over a model manager; starts and drains it."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Any, Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from gateway.http.edge import RestEdge
from gateway.http.listener import HttpListener, TlsFiles, port_limits
from gateway.http.service import RestService
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
from gateway.process.http_endpoints import HttpEndpoints, manager_readiness
from gateway.process.tls import CertificateFiles
from gateway.quota.redis_store import build_quota_store
from gateway.request.inflight import InflightLimit
from gateway.settings import Settings, check_exposure, upstream_configs
from gateway.tenancy.auth import Authenticator
from gateway.tenancy.tenants import TenantRegistry
from gateway.wire.codec import Codecs
from gateway.wire.edge import INFERENCE_SERVICE, Edge
from gateway.wire.reflection import add_reflection
from gateway.wire.rpc_observer import RpcObserver
from gateway.wire.servicer import InferenceServicer, add_inference_service
from gateway.wire.stream import StreamInfer, stream_handler
from gateway.wire.stream_observer import StreamObserver
from runtimes.onnx_runtime import OnnxOptions
from runtimes.triton_discovery import StoreWithUpstreams, TritonDiscovery
from runtimes.upstreams import UpstreamPool

log = logging.getLogger(__name__)

SERVING: Final = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: Final = health_pb2.HealthCheckResponse.NOT_SERVING


class BindError(Exception):
    """A listening address could not be bound; `setting` names the port setting that chose it."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


def address(host: str, port: int) -> str:
    """host:port, with IPv6 literals bracketed."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class Gateway:
    """One serving process: gRPC server plus the models it serves."""

    def __init__(self, settings: Settings, worker_index: int | None = None) -> None:
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
        self.health = HealthServicer()
        # SettingsError for an open public address or a bad tenants file: exit 2.
        check_exposure(settings)
        self.tenants = TenantRegistry(settings.tenants) if settings.tenants else None
        self.authenticator = Authenticator(self.tenants)
        self.quota = build_quota_store(
            settings.redis_url, settings.redis_failure_mode, self.metrics.count_redis_outage,
            table=settings.quota_table, worker_index=worker_index,
        )
        self.metrics.registry.register(DependencyCollector(self.upstreams, self.quota))
        self.inflight = InflightLimit(settings.max_inflight_requests)
        # What every transport adapter calls: inference, and what a tenant may learn.
        self.pipeline = InferencePipeline(self.manager, self.quota, self.monitor.hooks())
        self.catalog = Catalog(self.manager)
        # Triton's system shared memory: each tenant's regions (this process's only).
        self.shared_memory = SharedMemory(settings.max_message_bytes,
                                          self.metrics.count_shared_memory)
        # Triton's trace and logging extensions, over this process's tracing and root logger.
        self.server_settings = ServerSettings(
            self.manager, self.tracing.settings if self.tracing is not None else None,
            LogSettings(logging.getLogger()))
        # The KServe V2 REST port (settings.http_port; None: not served) over the same
        # pipeline, catalog, in-flight cap and authenticator as gRPC.
        self.rest: HttpListener | None = None
        self.rest_port = 0
        if settings.http_port is not None:
            self.rest = self._rest_listener(settings)
        limit = settings.max_message_bytes
        # Every handler passes the edge: observed, capped and authenticated in one place
        # (gateway/tenancy/auth.py lists the anonymous methods).
        self.edge = Edge(
            RpcObserver(self.metrics, self.tracing, self.access_log), self.inflight,
            self.authenticator, max_message_bytes=limit,
        )
        # ModelStreamInfer: the same pipeline, a message at a time (gateway/wire/stream.py).
        self.streams = StreamInfer(
            self.pipeline, Codecs(),
            StreamObserver(self.metrics, self.tracing, self.access_log),
            self.authenticator, settings.stream_max_inflight, inflight=self.inflight,
            max_open=settings.max_open_streams, idle_s=settings.stream_idle_s,
            max_message_bytes=limit, memory=self.shared_memory,
        )
        streams, connections = settings.max_concurrent_streams, settings.max_connections
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # gzip and deflate are accepted but inflated by the edge, in bounded steps
                # (gateway/wire/compression.py): core would inflate a message completely
                # before comparing it with the receive limit (docs/security.md), so 64 KiB
                # of gzip would cost 64 MiB and more. The receive limit then bounds what
                # was sent; the edge bounds what it inflates to.
                ("grpc.per_message_decompression", 0),
                # Only workers of one supervisor share the port; a lone server must fail
                # loudly when the port is taken instead of silently splitting traffic.
                ("grpc.so_reuseport", 1 if worker_index is not None else 0),
                # HTTP/2 back-pressure: calls beyond a connection's streams wait in the
                # client, not in gRPC's queue here ahead of everyone's (health probes too).
                # Overload protection off: with it grpcio also counts streams it has not
                # freed yet and refuses new ones (REFUSED_STREAM, UNAVAILABLE to clients)
                # from clients that keep to the limit.
                *([("grpc.max_concurrent_streams", streams),
                   ("grpc.http.overload_protection", 0)] if streams else []),
                *([("grpc.max_allowed_incoming_connections", connections)]
                  if connections else []),
            ]
        )
        self.port = 0
        self.edge_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        self.draining = False
        # The metrics port: the REST port's HTTP stack and limits; no route takes a body.
        self.http = HttpEndpoints(
            self.metrics, manager_readiness(self.manager, lambda: self.draining),
            port_limits(settings, max_body_bytes=0),
            DriftEndpoint(self.monitor, self.manager.models, self.manager.shadow.stats),
        )
        self.metrics_port = 0
        self.reloader = (
            Reloader(self.manager, settings.store, settings.poll_interval)
            if settings.poll_interval > 0 else None
        )

    def _rest_listener(self, settings: Settings) -> HttpListener:
        service = RestService(
            self.pipeline, self.catalog,
            ModelControl(self.manager, settings.enable_model_control), self.manager.ready,
            settings.max_message_bytes, settings=self.server_settings,
            memory=self.shared_memory,
            drift=DriftEndpoint(self.monitor, self.manager.models, self.manager.shadow.stats),
        )
        edge = RestEdge(service, self.inflight, self.authenticator, self.metrics,
                        tracing=self.tracing, access_log=self.access_log)
        tls = None
        if settings.tls_cert is not None and settings.tls_key is not None:
            tls = TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        return HttpListener(edge.handle, port_limits(settings, settings.max_message_bytes),
                            tls, screen=edge.screen)

    async def start(self) -> int:
        """Bind and start serving, then load the models (health and ServerLive answer
        while they load). Returns the bound port."""
        add_inference_service(
            InferenceServicer(
                self.pipeline, self.catalog,
                ModelControl(self.manager, self.settings.enable_model_control),
                self.manager.ready, self.server_settings, memory=self.shared_memory,
            ),
            self.edge,
        )
        self.edge.add_registered_method_handlers(
            INFERENCE_SERVICE, {"ModelStreamInfer": stream_handler(self.streams)})
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.edge)
        add_reflection(self.edge, (
            INFERENCE_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
        # By full method name, as served: tools (loadtests/hotpath.py) call them directly.
        self.edge_handlers = self.edge.install(self.server)
        target = address(self.settings.host, self.settings.grpc_port)
        try:
            if self.settings.tls_cert is not None and self.settings.tls_key is not None:
                files = CertificateFiles(
                    self.settings.tls_cert, self.settings.tls_key, self.settings.tls_client_ca
                )
                self.port = self.server.add_secure_port(target, files.credentials())
            else:
                self.port = self.server.add_insecure_port(target)
        except RuntimeError as exc:
            raise BindError("grpc_port", f"cannot bind {target}: {exc}") from exc
        await self.health.set("", NOT_SERVING)
        await self.quota.start()
        if self.tenants is not None:
            self.tenants.start()
        else:
            log.warning("no tenants file: the gateway is open, every caller may use every "
                        "model without a key (local development only)")
        await self.server.start()
        if self.rest is not None and self.settings.http_port is not None:
            try:
                # Workers of one supervisor share the port, as they share gRPC's.
                self.rest_port = await self.rest.start(
                    self.settings.host, self.settings.http_port, self.worker_index is not None
                )
            except OSError as exc:
                await self.server.stop(0)
                target = address(self.settings.host, self.settings.http_port)
                raise BindError("http_port", f"cannot bind {target}: {exc}") from exc
        await self._start_http()
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
        """Publish overall and per-model health: a model is SERVING while a version is ready
        (a remote one: while an upstream has it ready)."""
        for model in self.manager.models():
            serving = any(
                v.state is VersionState.READY and (v.runtime is None or v.runtime.ready())
                for v in model.versions.values()
            )
            await self.health.set(model.name, SERVING if serving else NOT_SERVING)
        overall = SERVING if self.manager.ready() else NOT_SERVING
        await self.health.set("", overall)
        await self.health.set(INFERENCE_SERVICE, overall)

    async def _start_http(self) -> None:
        host, port = self.settings.host, self.settings.metrics_port
        if self.worker_index is not None:
            # A worker's registry is scraped by its supervisor, which serves the metrics
            # port with every worker's samples merged.
            host, port = "127.0.0.1", 0
        try:
            self.metrics_port = await self.http.start(host, port)
        except OSError as exc:
            await self.server.stop(0)
            raise BindError(
                "metrics_port", f"cannot bind {address(self.settings.host, port)}: {exc}"
            ) from exc

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish within the grace period, unload."""
        self.draining = True
        await self.health.enter_graceful_shutdown()
        if self.reloader is not None:
            await self.reloader.stop()
        await self.discovery.stop()
        grace_s = self.settings.grace_period_s if grace is None else grace
        # Both transports drain at once: in-flight requests of each finish within the grace.
        await asyncio.gather(
            # Open streams get the grace period, then end UNAVAILABLE (not CANCELLED).
            self.streams.close_after(grace_s),
            self.server.stop(grace_s),
            *([self.rest.stop(grace_s)] if self.rest is not None else []),
        )
        await self.quota.close()
        self.shared_memory.close()
        if self.tenants is not None:
            await self.tenants.stop()
        await self.manager.stop()
        self.monitor.stop()
        await self.upstreams.close()
        await self.http.stop()
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
    if started is not None:
        started(gateway)
    await stopping.wait()
    log.info("signal received: draining (grace period %.1fs)", settings.grace_period_s)
    await gateway.stop()
    log.info("stopped")
    return 0
