"""The edge wraps every handler a service registers, and refuses at start-up a handler it
could not enumerate (so no method can slip past auth unwrapped)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from gateway.observability.metrics import Metrics
from gateway.request.inflight import InflightLimit
from gateway.tenancy.auth import Authenticator
from gateway.wire.edge import Edge, EdgeError
from gateway.wire.rpc_observer import RpcObserver


class _Opaque(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    def service(self, handler_call_details: Any) -> None:
        return None


class _Server:
    def __init__(self) -> None:
        self.generic: list[Any] = []
        self.registered: dict[str, dict[str, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.registered[service] = handlers


def edge() -> Edge:
    return Edge(RpcObserver(Metrics(process_metrics=False), None, None), InflightLimit(4),
                Authenticator(None))


async def behavior(request: Any, context: Any) -> str:
    return "answer"


def test_a_handler_without_a_method_table_is_refused() -> None:
    with pytest.raises(EdgeError, match="cannot enumerate"):
        edge().add_generic_rpc_handlers([_Opaque()])


def test_a_service_without_its_method_table_is_refused() -> None:
    gate = edge()
    handlers = {"Call": grpc.unary_unary_rpc_method_handler(behavior)}
    gate.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("pkg.Svc", handlers)])
    with pytest.raises(EdgeError, match=r"pkg\.Svc"):
        gate.install(_Server())  # type: ignore[arg-type]


def test_every_registered_method_is_served_wrapped() -> None:
    gate = edge()
    handlers = {
        "Call": grpc.unary_unary_rpc_method_handler(behavior),
        "Stream": grpc.unary_stream_rpc_method_handler(behavior),
    }
    gate.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("pkg.Svc", handlers)])
    gate.add_registered_method_handlers("pkg.Svc", handlers)
    server = _Server()
    table = gate.install(server)  # type: ignore[arg-type]
    assert set(table) == {"/pkg.Svc/Call", "/pkg.Svc/Stream"}
    for name, handler in handlers.items():
        wrapped = table[f"/pkg.Svc/{name}"]
        assert wrapped is not handler  # auth wraps every method off the anonymous list
    assert server.registered["pkg.Svc"].keys() == handlers.keys()
    (generic,) = server.generic
    details = grpc.HandlerCallDetails()
    details.method = "/pkg.Svc/Call"  # type: ignore[misc]
    assert generic.service(details) is table["/pkg.Svc/Call"]
