"""Wires the gRPC server: the inference service, the standard health service (overall and
per model) and server reflection, over a model manager; starts and drains it."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from gateway.backends import RuntimeFactory
from gateway.manager import ModelManager, VersionState
from gateway.servicer import InferenceServicer
from gateway.settings import Settings
from model_store.repository import ModelRepository
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc
from runtimes.onnx_runtime import OnnxOptions

log = logging.getLogger(__name__)

INFERENCE_SERVICE: Final = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVING: Final = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: Final = health_pb2.HealthCheckResponse.NOT_SERVING


class BindError(Exception):
    """The gRPC address could not be bound."""


def address(host: str, port: int) -> str:
    """host:port, with IPv6 literals bracketed."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class Gateway:
    """One serving process: gRPC server plus the models it serves."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        factory = RuntimeFactory(
            OnnxOptions(
                device=settings.device,
                intra_op_threads=settings.intra_op_threads,
                inter_op_threads=settings.inter_op_threads,
            )
        )
        self.manager = ModelManager(ModelRepository(settings.store), factory)
        self.health = HealthServicer()
        limit = settings.max_message_bytes
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ]
        )
        self.port = 0

    async def start(self) -> int:
        """Bind and start serving, then load the models (health and ServerLive answer
        while they load). Returns the bound port."""
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            InferenceServicer(self.manager), self.server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (INFERENCE_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            self.server,
        )
        target = address(self.settings.host, self.settings.grpc_port)
        try:
            self.port = self.server.add_insecure_port(target)
        except RuntimeError as exc:
            raise BindError(f"cannot bind {target}: {exc}") from exc
        await self.health.set("", NOT_SERVING)
        await self.server.start()
        await self.manager.start()
        await self.refresh_health()
        models = self.manager.models()
        ready = sum(
            1 for m in models if any(v.state is VersionState.READY for v in m.versions.values())
        )
        log.info(
            "modelgate serving %d of %d models on %s (store: %s)",
            ready, len(models), address(self.settings.host, self.port), self.settings.store,
        )
        return self.port

    async def refresh_health(self) -> None:
        """Publish overall and per-model health: a model is SERVING while a version is ready."""
        for model in self.manager.models():
            serving = any(v.state is VersionState.READY for v in model.versions.values())
            await self.health.set(model.name, SERVING if serving else NOT_SERVING)
        overall = SERVING if self.manager.ready() else NOT_SERVING
        await self.health.set("", overall)
        await self.health.set(INFERENCE_SERVICE, overall)

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish within the grace period, unload."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.grace_period_s if grace is None else grace)
        await self.manager.stop()


async def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT, then drain and return the exit code."""
    gateway = Gateway(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await gateway.start()
    await stopping.wait()
    log.info("signal received: draining (grace period %.1fs)", settings.grace_period_s)
    await gateway.stop()
    log.info("stopped")
    return 0
