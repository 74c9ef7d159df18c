"""The KServe V2 REST frontend: the service behind the REST edge, on an HttpListener bound
to settings.http_port, over the same shared parts as gRPC."""

from __future__ import annotations

from gateway.http.edge import RestEdge
from gateway.http.listener import HttpListener, TlsFiles, port_limits
from gateway.http.service import RestService
from gateway.process.frontend import BindError, Services, address


class RestFrontend:
    """The REST port, bound to ``port`` (settings.http_port, when set)."""

    def __init__(self, services: Services, port: int) -> None:
        settings = services.settings
        service = RestService(
            services.pipeline, services.catalog, services.control, services.manager.ready,
            settings.max_message_bytes, settings=services.server_settings,
            memory=services.shared_memory, drift=services.drift,
        )
        edge = RestEdge(service, services.inflight, services.authenticator, services.metrics,
                        tracing=services.tracing, access_log=services.access_log)
        tls = None
        if settings.tls_cert is not None and settings.tls_key is not None:
            tls = TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        self.listener = HttpListener(edge.handle,
                                      port_limits(settings, settings.max_message_bytes),
                                      tls, screen=edge.screen)
        self._services = services
        self._port = port
        self.port = 0

    async def start(self) -> None:
        settings = self._services.settings
        port = self._port
        try:
            # Workers of one supervisor share the port, as they share gRPC's.
            self.port = await self.listener.start(
                settings.host, port, self._services.worker_index is not None)
        except OSError as exc:
            target = address(settings.host, port)
            raise BindError("http_port", f"cannot bind {target}: {exc}") from exc

    async def stop(self, grace: float) -> None:
        await self.listener.stop(grace)
