"""The gRPC frontend: the server and its options, the inference service (unary and
ModelStreamInfer) behind the edge, the standard health service (overall and per model) and
server reflection."""

from __future__ import annotations

import asyncio
from typing import Any, Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from gateway.models.manager import VersionState
from gateway.process.frontend import BindError, Services, address
from gateway.process.tls import CertificateFiles
from gateway.settings import Settings
from gateway.wire.codec import Codecs
from gateway.wire.edge import INFERENCE_SERVICE, Edge
from gateway.wire.reflection import add_reflection
from gateway.wire.rpc_observer import RpcObserver
from gateway.wire.servicer import InferenceServicer, add_inference_service
from gateway.wire.stream import StreamInfer, stream_handler
from gateway.wire.stream_observer import StreamObserver

SERVING: Final = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: Final = health_pb2.HealthCheckResponse.NOT_SERVING


def server_options(settings: Settings, shared_port: bool) -> list[tuple[str, int]]:
    """grpc.aio's channel arguments for the server; ``shared_port``: workers of one
    supervisor bind the same port."""
    limit = settings.max_message_bytes
    streams, connections = settings.max_concurrent_streams, settings.max_connections
    return [
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
        ("grpc.so_reuseport", 1 if shared_port else 0),
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


class GrpcFrontend:
    """The gRPC port (settings.grpc_port). Health answers NOT_SERVING from the moment the
    port is bound until ``refresh_health`` finds models ready."""

    def __init__(self, services: Services) -> None:
        settings = services.settings
        self._services = services
        self.health = HealthServicer()
        limit = settings.max_message_bytes
        # Every handler passes the edge: observed, capped and authenticated in one place
        # (gateway/tenancy/auth.py lists the anonymous methods).
        self.edge = Edge(
            RpcObserver(services.metrics, services.tracing, services.access_log),
            services.inflight, services.authenticator, max_message_bytes=limit,
        )
        # ModelStreamInfer: the same pipeline, a message at a time (gateway/wire/stream.py).
        self.streams = StreamInfer(
            services.pipeline, Codecs(),
            StreamObserver(services.metrics, services.tracing, services.access_log),
            services.authenticator, settings.stream_max_inflight, inflight=services.inflight,
            max_open=settings.max_open_streams, idle_s=settings.stream_idle_s,
            max_message_bytes=limit, memory=services.shared_memory,
        )
        self.server = grpc.aio.server(
            options=server_options(settings, services.worker_index is not None))
        self.port = 0
        # By full method name, as served: tools (loadtests/hotpath.py) call them directly.
        self.edge_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    async def start(self) -> None:
        services, settings = self._services, self._services.settings
        add_inference_service(
            InferenceServicer(
                services.pipeline, services.catalog, services.control,
                services.manager.ready, services.server_settings,
                memory=services.shared_memory,
            ),
            self.edge,
        )
        self.edge.add_registered_method_handlers(
            INFERENCE_SERVICE, {"ModelStreamInfer": stream_handler(self.streams)})
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.edge)
        add_reflection(self.edge, (
            INFERENCE_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
        self.edge_handlers = self.edge.install(self.server)
        target = address(settings.host, settings.grpc_port)
        try:
            if settings.tls_cert is not None and settings.tls_key is not None:
                files = CertificateFiles(settings.tls_cert, settings.tls_key,
                                         settings.tls_client_ca)
                self.port = self.server.add_secure_port(target, files.credentials())
            else:
                self.port = self.server.add_insecure_port(target)
        except RuntimeError as exc:
            raise BindError("grpc_port", f"cannot bind {target}: {exc}") from exc
        await self.health.set("", NOT_SERVING)
        await self.server.start()

    async def refresh_health(self) -> None:
        """Publish overall and per-model health: a model is SERVING while a version is ready
        (a remote one: while an upstream has it ready)."""
        manager = self._services.manager
        for model in manager.models():
            serving = any(
                v.state is VersionState.READY and (v.runtime is None or v.runtime.ready())
                for v in model.versions.values()
            )
            await self.health.set(model.name, SERVING if serving else NOT_SERVING)
        overall = SERVING if manager.ready() else NOT_SERVING
        await self.health.set("", overall)
        await self.health.set(INFERENCE_SERVICE, overall)

    async def enter_graceful_shutdown(self) -> None:
        """Health answers NOT_SERVING from now on, whatever the models' states."""
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float) -> None:
        # Open streams get the grace period, then end UNAVAILABLE (not CANCELLED).
        await asyncio.gather(self.streams.close_after(grace), self.server.stop(grace))
