"""The pool of remote Triton upstreams: their declarations (``NAME=HOST:PORT,key=value``), one
gRPC channel each, least-outstanding choice, and probing that takes failing upstreams out of
rotation and puts them back once they answer again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc

from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc
from runtimes.errors import UpstreamBusyError, UpstreamUnavailableError

log = logging.getLogger(__name__)

_TRUE: Final = ("1", "true", "yes", "on")
_FALSE: Final = ("0", "false", "no", "off")
# Reconnect quickly after an upstream restarts: gRPC's default backoff grows to two minutes,
# which would keep a recovered upstream out of rotation long after probes see it again.
_CHANNEL_BACKOFF: Final = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """TLS towards one upstream; files are PEM. No CA file means the system roots."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str = ""


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """One declared upstream. ``max_in_flight`` 0 is unlimited; ``timeout_s`` 0 leaves only
    the caller's deadline; ``export`` serves every model the upstream has."""

    name: str
    host: str
    port: int
    max_in_flight: int = 0
    timeout_s: float = 0.0
    tls: TlsOptions | None = None
    export: bool = False

    @property
    def target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_upstream(text: str) -> UpstreamConfig:
    """Parse ``NAME=HOST:PORT[,key=value...]``; keys: max_in_flight, timeout_s, export, tls,
    ca, cert, key, server_name. Raises ValueError saying what is wrong."""
    head, *options = [part.strip() for part in text.split(",")]
    name, sep, address = head.partition("=")
    if not sep or not name or not address:
        raise ValueError(f"{text!r}: expected NAME=HOST:PORT[,key=value...]")
    host, colon, port_text = address.rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r}: '{address}' is not HOST:PORT")
    values: dict[str, str] = {}
    for option in options:
        key, eq, value = option.partition("=")
        if not eq or not key:
            raise ValueError(f"{text!r}: option {option!r} is not key=value")
        values[key.strip()] = value.strip()
    try:
        return _build(name.strip(), host, int(port_text), values)
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None


def _build(name: str, host: str, port: int, values: dict[str, str]) -> UpstreamConfig:
    known = {"max_in_flight", "timeout_s", "export", "tls", "ca", "cert", "key", "server_name"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    max_in_flight = int(values.get("max_in_flight", "0"))
    timeout_s = float(values.get("timeout_s", "0"))
    if max_in_flight < 0 or timeout_s < 0:
        raise ValueError("max_in_flight and timeout_s must not be negative")
    tls: TlsOptions | None = None
    if _flag(values.get("tls", "")) or {"ca", "cert", "key", "server_name"} & set(values):
        files = {k: Path(values[k]).expanduser() for k in ("ca", "cert", "key") if k in values}
        if ("cert" in files) != ("key" in files):
            raise ValueError("cert and key go together (client certificate and its key)")
        for path in files.values():
            if not path.is_file():
                raise ValueError(f"{path} is not a file")
        tls = TlsOptions(files.get("ca"), files.get("cert"), files.get("key"),
                         values.get("server_name", ""))
    return UpstreamConfig(name, host, port, max_in_flight, timeout_s, tls,
                          _flag(values.get("export", "")) or values.get("export") == "all")


def _flag(text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE or not text or text == "all":
        return False
    raise ValueError(f"{text!r} is not a boolean")


@dataclass(slots=True)
class Upstream:
    """One upstream's channel and what the pool knows about it."""

    config: UpstreamConfig
    channel: grpc.aio.Channel
    stub: pb_grpc.GRPCInferenceServiceStub
    healthy: bool = True
    reason: str = ""
    outstanding: int = 0
    completed: int = 0
    ready_models: set[tuple[str, str]] = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.config.name

    def has_room(self) -> bool:
        limit = self.config.max_in_flight
        return limit == 0 or self.outstanding < limit


def _channel(config: UpstreamConfig, max_message_bytes: int) -> grpc.aio.Channel:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        *_CHANNEL_BACKOFF,
    ]
    tls = config.tls
    if tls is None:
        return grpc.aio.insecure_channel(config.target, options=options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.ca_file.read_bytes() if tls.ca_file else None,
        private_key=tls.key_file.read_bytes() if tls.key_file else None,
        certificate_chain=tls.cert_file.read_bytes() if tls.cert_file else None,
    )
    return grpc.aio.secure_channel(config.target, credentials, options=options)


class UpstreamPool:
    """Every declared upstream. ``start`` probes once and then keeps probing every
    ``probe_interval_s``: an upstream is taken out when ServerReady fails and put back when
    it answers ready again; which models it has ready comes from its RepositoryIndex."""

    def __init__(
        self,
        configs: Iterable[UpstreamConfig],
        probe_interval_s: float = 1.0,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._configs = {c.name: c for c in configs}
        self._interval = probe_interval_s
        self._max_message = max_message_bytes
        self.upstreams: dict[str, Upstream] = {}
        self._watched: dict[tuple[str, str], int] = {}
        self._task: asyncio.Task[None] | None = None
        self._turn = 0
        self._listeners: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._notifications: set[asyncio.Task[None]] = set()

    @property
    def configs(self) -> Mapping[str, UpstreamConfig]:
        return self._configs

    def add_listener(self, listener: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Await ``listener`` whenever an upstream goes out or comes back or its ready
        models change (the gateway republishes per-model health)."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            task = asyncio.get_running_loop().create_task(listener())
            self._notifications.add(task)
            task.add_done_callback(self._notifications.discard)

    async def start(self) -> None:
        """Open the channels, probe once, then probe in the background."""
        for name, config in self._configs.items():
            channel = _channel(config, self._max_message)
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            self.upstreams[name] = Upstream(config, channel, stub)
        await self.probe()
        if self._task is None and self._configs:
            self._task = asyncio.create_task(self._probe_forever(), name="upstream-probes")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for upstream in self.upstreams.values():
            await upstream.channel.close(None)
        self.upstreams.clear()

    def watch(self, model: str, version: str) -> None:
        """Probe this remote model's readiness from now on."""
        key = (model, version)
        self._watched[key] = self._watched.get(key, 0) + 1

    def unwatch(self, model: str, version: str) -> None:
        key = (model, version)
        left = self._watched.get(key, 0) - 1
        if left > 0:
            self._watched[key] = left
        else:
            self._watched.pop(key, None)

    def model_ready(self, names: Iterable[str], model: str, version: str) -> bool:
        """Whether any of these upstreams is healthy and has the model ready."""
        return any(
            (u := self.upstreams.get(n)) is not None and u.healthy
            and (model, version) in u.ready_models
            for n in names
        )

    def pick(self, names: Iterable[str], model: str, version: str,
             exclude: Upstream | None = None) -> Upstream:
        """The upstream for the next request: among the healthy ones, those the probes saw
        with the model ready come first (when none did, a healthy one is asked anyway: its
        answer, NOT_FOUND for instance, is more current than a probe); then the fewest
        outstanding requests, ties taken in turn."""
        names = tuple(names)
        healthy = [
            u for n in names
            if (u := self.upstreams.get(n)) is not None and u is not exclude and u.healthy
        ]
        if not healthy:
            raise UpstreamUnavailableError(
                f"no upstream can serve model '{model}' "
                f"(upstreams: {', '.join(self._describe(names))})"
            )
        candidates = [u for u in healthy if (model, version) in u.ready_models] or healthy
        roomy = [u for u in candidates if u.has_room()]
        if not roomy:
            raise UpstreamBusyError(
                f"every upstream of model '{model}' is at its max_in_flight limit"
            )
        self._turn += 1
        start = self._turn % len(roomy)
        return min(roomy[start:] + roomy[:start], key=lambda u: u.outstanding)

    def _describe(self, names: Iterable[str]) -> list[str]:
        out = []
        for name in names:
            upstream = self.upstreams.get(name)
            state = "unknown" if upstream is None else (
                "up" if upstream.healthy else f"down: {upstream.reason}")
            out.append(f"{name} ({state})")
        return out

    def take_out(self, upstream: Upstream, reason: str) -> None:
        """Stop routing to ``upstream`` until a probe finds it ready again."""
        was_healthy = upstream.healthy
        upstream.healthy = False
        upstream.reason = reason
        if was_healthy:
            log.warning("upstream %s (%s) taken out: %s", upstream.name,
                        upstream.config.target, reason)
            self._changed()

    async def probe(self) -> None:
        """Probe every upstream once (concurrently)."""
        await asyncio.gather(*(self._probe(u) for u in list(self.upstreams.values())))

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.probe()
            except Exception:  # a probe bug must not stop probing for good
                log.exception("upstream probe failed")

    async def _probe(self, upstream: Upstream) -> None:
        # Generous: a busy upstream (or a busy gateway) must not look dead.
        timeout = max(1.0, min(self._interval, 5.0))
        try:
            response = await upstream.stub.ServerReady(pb.ServerReadyRequest(), timeout=timeout)
            ready = await self._ready_models(upstream, timeout) if response.ready else set()
        except grpc.aio.AioRpcError as exc:
            self.take_out(upstream, f"{exc.code().name}: {exc.details()}")
            return
        if not response.ready:
            self.take_out(upstream, "ServerReady answered not ready")
            return
        changed = ready != upstream.ready_models or not upstream.healthy
        upstream.ready_models = ready
        if not upstream.healthy:
            log.info("upstream %s (%s) is back", upstream.name, upstream.config.target)
        upstream.healthy = True
        upstream.reason = ""
        if changed:
            self._changed()

    async def _ready_models(self, upstream: Upstream, rpc_timeout: float
                            ) -> set[tuple[str, str]]:
        """The watched (model, version) pairs the upstream has ready; (model, "") stands for
        "whichever version the upstream picks". One RepositoryIndex call answers for every
        model; a server without Triton's repository extension is asked model by model."""
        watched = list(self._watched)
        if not watched:
            return set()
        try:
            index = await upstream.stub.RepositoryIndex(
                pb.RepositoryIndexRequest(ready=True), timeout=rpc_timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.UNIMPLEMENTED:
                raise
            answers = await asyncio.gather(*(
                upstream.stub.ModelReady(pb.ModelReadyRequest(name=m, version=v),
                                         timeout=rpc_timeout)
                for m, v in watched
            ))
            return {key for key, a in zip(watched, answers, strict=True) if a.ready}
        ready: set[tuple[str, str]] = set()
        for entry in index.models:
            if entry.state == "READY":
                ready.update({(entry.name, entry.version), (entry.name, "")})
        return ready
