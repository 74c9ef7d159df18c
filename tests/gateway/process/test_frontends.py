"""The map's new-transport recipe, done once: a toy line-per-request transport is a
Frontend built from the gateway's shared Services, given to Gateway(frontends=...), and
serves inference through the same pipeline, in-flight cap, authenticator and status table
as gRPC; the gateway starts it with the others and drains it on stop."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from gateway.process.frontend import BindError, Frontend, Services
from gateway.process.server import Gateway
from gateway.request.context import RequestContext
from gateway.request.decoded import DecodedRequest, RequestLayout
from gateway.settings import Settings
from gateway.status import status_of
from model_store.datatypes import DataType
from runtimes.base import InferRequest
from tests.support import models


class LineFrontend:
    """One JSON object per line in, one per line out: {"model", "x"} -> {"y"} or
    {"status", "message"}; authenticated by an optional "key"."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self, grace: float) -> None:
        assert self._server is not None
        self._server.close()
        await asyncio.wait_for(self._server.wait_closed(), grace or None)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(json.dumps(await self._answer(json.loads(line))).encode() + b"\n")
            await writer.drain()
        writer.close()

    async def _answer(self, call: dict[str, object]) -> dict[str, object]:
        services = self._services
        started: float | None = None
        try:
            started = services.inflight.enter()
            key = call.get("key")
            tenant = services.authenticator.authenticate(
                (("authorization", f"Bearer {key}"),) if isinstance(key, str) else ())
            x = np.asarray(call["x"], np.float32)
            decoded = DecodedRequest(InferRequest(inputs={"x": x}),
                                     RequestLayout((("x", DataType.FP32, x.shape),), ()))
            inference = await services.pipeline.infer(
                RequestContext(tenant), str(call["model"]), "", decoded)
            return {"y": inference.outputs["y"].tolist(),
                    "version": inference.version.id.version}
        except Exception as exc:  # the one status table answers every error
            status = status_of(exc)
            return {"status": status.code.name, "message": status.message}
        finally:
            if started is not None:
                services.inflight.leave(started)


async def _call(port: int, call: dict[str, object]) -> dict[str, object]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(json.dumps(call).encode() + b"\n")
        answer: dict[str, object] = json.loads(await reader.readline())
        return answer
    finally:
        writer.close()
        await writer.wait_closed()


def _settings(store: Path, **overrides: object) -> Settings:
    chosen: dict[str, object] = {"grpc_port": 0, "metrics_port": 0, **overrides}
    return dataclasses.replace(Settings(), store=store, host="127.0.0.1", grace_period_s=1.0,
                               **chosen)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    models.write_model(tmp_path, "add", 1, models.add_constant(1.0),
                       models.add_model_config("add"))
    return tmp_path


async def test_a_frontend_given_to_the_gateway_serves_through_the_pipeline(store: Path) -> None:
    built: list[LineFrontend] = []

    def line_frontend(services: Services) -> Frontend:
        built.append(LineFrontend(services))
        return built[0]

    gateway = Gateway(_settings(store), frontends=[line_frontend])
    await gateway.start()
    try:
        (toy,) = built
        assert toy in gateway.frontends and toy.port
        answer = await _call(toy.port, {"model": "add", "x": [[1, 2, 3, 4]]})
        assert answer == {"y": [[2.0, 3.0, 4.0, 5.0]], "version": 1}
        # Domain errors reach the transport through the same table as gRPC's.
        missing = await _call(toy.port, {"model": "nope", "x": [[1, 2, 3, 4]]})
        assert missing["status"] == "NOT_FOUND" and "nope" in str(missing["message"])
        wrong = await _call(toy.port, {"model": "add", "x": [[1, 2]]})
        assert wrong["status"] == "INVALID_ARGUMENT"
        assert gateway.inflight.inflight == 0
    finally:
        await gateway.stop(grace=1.0)
    # Drained with the other transports: the toy port no longer accepts.
    with pytest.raises(OSError):
        await _call(toy.port, {"model": "add", "x": [[1, 2, 3, 4]]})


async def test_a_busy_port_names_its_setting_and_stops_the_frontends_already_started(
    store: Path,
) -> None:
    holder = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    busy = holder.sockets[0].getsockname()[1]
    built: list[LineFrontend] = []

    def line_frontend(services: Services) -> Frontend:
        built.append(LineFrontend(services))
        return built[0]

    try:
        # The metrics port starts after every transport: the toy had started by then.
        gateway = Gateway(_settings(store, metrics_port=busy), frontends=[line_frontend])
        with pytest.raises(BindError) as caught:
            await gateway.start()
        assert caught.value.setting == "metrics_port"
        (toy,) = built
        assert toy.port
        with pytest.raises(OSError):
            await _call(toy.port, {"model": "add", "x": [[1, 2, 3, 4]]})
    finally:
        holder.close()
        await holder.wait_closed()
