"""Every method the server registers, enumerated from the registrations themselves and from
reflection's service descriptors, is called without a key, with a bad key and with keys of
an ordinary and an admin tenant: only the explicit anonymous allow-list answers a caller
without a key, and model control answers only an admin."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from gateway.http.routes import ROUTES, match
from gateway.process.server import Gateway
from gateway.settings import Settings

pytestmark = pytest.mark.timeout(180)

# Decided and documented (docs/security.md): probes and API
# discovery only. A method moving onto this list must be a deliberate change here too.
ANONYMOUS_ALLOWED = frozenset({
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
})
ADMIN_ONLY = frozenset({
    "/inference.GRPCInferenceService/RepositoryModelLoad",
    "/inference.GRPCInferenceService/RepositoryModelUnload",
})


@dataclasses.dataclass
class Served:
    target: str
    # full method name -> "unary_unary" | "unary_stream" | "stream_unary" | "stream_stream"
    registered: dict[str, str]
    rest_port: int = 0  # the KServe V2 REST port of the same gateway


def _kind(handler: Any) -> str:
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        if getattr(handler, kind) is not None:
            return kind
    raise AssertionError(f"handler {handler!r} has no behavior")


@contextlib.contextmanager
def recording_gateway(settings: Settings) -> Iterator[Served]:
    """The real Gateway, with every method handler it registers recorded on the way in
    (grpc.aio cannot list them afterwards)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    registered: dict[str, str] = {}

    async def build() -> Gateway:
        gateway = Gateway(settings)
        server: Any = gateway.server
        original = server.add_registered_method_handlers

        def record(service: str, handlers: dict[str, Any]) -> Any:
            for name, handler in handlers.items():
                registered[f"/{service}/{name}"] = _kind(handler)
            return original(service, handlers)

        server.add_registered_method_handlers = record
        return gateway

    gateway = asyncio.run_coroutine_threadsafe(build(), loop).result(30)
    try:
        port = asyncio.run_coroutine_threadsafe(gateway.start(), loop).result(120)
        yield Served(f"127.0.0.1:{port}", registered, gateway.rest_port)
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(gateway.stop(grace=1.0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


@pytest.fixture(scope="module")
def served(hardening_store: Path, tenant_keys: tuple[Path, str, str]) -> Iterator[Served]:
    settings = dataclasses.replace(
        Settings(), store=hardening_store, host="127.0.0.1", grpc_port=0, metrics_port=0,
        tenants=tenant_keys[0], enable_model_control=True, http_port=0,
    )
    with recording_gateway(settings) as served:
        yield served


def reflected_methods(target: str) -> dict[str, str]:
    """Every method of every service reflection lists, from the descriptors it serves."""
    with grpc.insecure_channel(target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(database)
        methods: dict[str, str] = {}
        for service_name in database.get_services():
            service = pool.FindServiceByName(service_name)  # type: ignore[no-untyped-call]
            for method in service.methods:
                proto = descriptor_pb2.MethodDescriptorProto()
                method.CopyToProto(proto)
                client, server = proto.client_streaming, proto.server_streaming
                kind = f"{'stream' if client else 'unary'}_{'stream' if server else 'unary'}"
                methods[f"/{service.full_name}/{method.name}"] = kind
        return methods


def call(target: str, method: str, kind: str, metadata: tuple[tuple[str, str], ...]) -> (
    grpc.StatusCode
):
    """Call ``method`` with an empty message (valid for every proto message type); the
    status it answers with. Streams count as answered OK when a first message arrives."""
    with grpc.insecure_channel(target) as channel:
        try:
            raw = (None, None)  # bytes in, bytes out: no (de)serializer
            if kind == "unary_unary":
                channel.unary_unary(method, *raw)(b"", metadata=metadata, timeout=10)
            elif kind == "stream_unary":
                channel.stream_unary(method, *raw)(iter([b""]), metadata=metadata, timeout=10)
            else:
                call = (channel.unary_stream(method, *raw)(b"", metadata=metadata, timeout=10)
                        if kind == "unary_stream"
                        else channel.stream_stream(method, *raw)(iter([b""]),
                                                                 metadata=metadata, timeout=10))
                with contextlib.suppress(StopIteration):
                    next(iter(call))
                call.cancel()  # type: ignore[no-untyped-call]
        except grpc.RpcError as exc:
            code = exc.code()
            assert isinstance(code, grpc.StatusCode)
            return code
    return grpc.StatusCode.OK


def test_reflection_shows_every_registered_method(served: Served) -> None:
    reflected = reflected_methods(served.target)
    assert reflected == served.registered
    services = {method.split("/")[1] for method in served.registered}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
    assert any(s.startswith("grpc.reflection.") for s in services)


def test_no_method_outside_the_allow_list_answers_without_a_valid_key(served: Served) -> None:
    assert served.registered.keys() >= ANONYMOUS_ALLOWED
    for method, kind in sorted(served.registered.items()):
        for metadata in ((), (("authorization", "Bearer mg_user_not-a-key"),),
                         (("x-api-key", "mg_boss_" + "A" * 40),)):
            code = call(served.target, method, kind, metadata)
            if method in ANONYMOUS_ALLOWED:
                assert code is not grpc.StatusCode.UNAUTHENTICATED, (method, metadata)
            else:
                assert code is grpc.StatusCode.UNAUTHENTICATED, (method, metadata, code)


def test_an_unregistered_method_is_unimplemented_not_served(served: Served) -> None:
    for method in ("/inference.GRPCInferenceService/Shutdown", "/modelgate.Admin/Anything",
                   "/grpc.health.v1.Health/Check/../../x"):
        assert call(served.target, method, "unary_unary", ()) is grpc.StatusCode.UNIMPLEMENTED


def test_model_control_needs_an_admin_and_everything_else_takes_a_key(
    served: Served, tenant_keys: tuple[Path, str, str]
) -> None:
    _, user, boss = tenant_keys
    for method, kind in sorted(served.registered.items()):
        user_code = call(served.target, method, kind, (("authorization", f"Bearer {user}"),))
        assert user_code is not grpc.StatusCode.UNAUTHENTICATED, method
        if method in ADMIN_ONLY:
            assert user_code is grpc.StatusCode.PERMISSION_DENIED, method
            boss_code = call(served.target, method, kind, (("x-api-key", boss),))
            # Authorized: the empty request then fails on its own merits (no model name).
            assert boss_code not in (grpc.StatusCode.UNAUTHENTICATED,
                                     grpc.StatusCode.PERMISSION_DENIED), method


# The REST routes, by the gRPC method each mirrors: the same allow-list and admin-only set.
REST_ANONYMOUS = frozenset({"ServerLive", "ServerReady"})
REST_ADMIN_ONLY = frozenset({"RepositoryModelLoad", "RepositoryModelUnload"})


def rest_call(port: int, method: str, path: str, headers: dict[str, str]) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=b"" if method == "POST" else None,
                           headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def rest_routes() -> list[tuple[str, str, str]]:
    """(HTTP method, a concrete path, the gRPC method it mirrors) for every REST route."""
    out = []
    for method, template in ROUTES:
        path = template.replace("{m}", "add").replace("{v}", "1")
        route = match(path)
        assert route is not None and method in route.method.split(), template
        out.append((method, path, route.name))
    return out


def test_every_rest_route_is_listed_and_served() -> None:
    names = {name for _, _, name in rest_routes()}
    # Every gRPC method the REST port mirrors has a route, and only those; plus the drift
    # report (no gRPC twin).
    assert names == {"ServerLive", "ServerReady", "ServerMetadata", "ModelMetadata",
                     "ModelReady", "ModelConfig", "ModelStatistics", "ModelInfer",
                     "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload",
                     "ModelDrift", "TraceSetting", "LogSettings", "ModelGenerate",
                     "ModelGenerateStream",
                     *(f"{kind}SharedMemory{action}" for kind in ("System", "Cuda")
                       for action in ("Status", "Register", "Unregister"))}


def test_no_rest_route_outside_the_allow_list_answers_without_a_valid_key(
    served: Served,
) -> None:
    assert served.rest_port
    for method, path, name in rest_routes():
        for headers in ({}, {"authorization": "Bearer mg_user_not-a-key"},
                        {"x-api-key": "mg_boss_" + "A" * 40}):
            status = rest_call(served.rest_port, method, path, headers)
            if name in REST_ANONYMOUS:
                assert status == 200, (path, headers, status)
            else:
                assert status == 401, (path, headers, status)


def test_rest_model_control_needs_an_admin_and_everything_else_takes_a_key(
    served: Served, tenant_keys: tuple[Path, str, str]
) -> None:
    _, user, boss = tenant_keys
    for method, path, name in rest_routes():
        status = rest_call(served.rest_port, method, path, {"authorization": f"Bearer {user}"})
        assert status != 401, path
        if name in REST_ADMIN_ONLY:
            assert status == 403, (path, status)
            assert rest_call(served.rest_port, method, path, {"x-api-key": boss}) not in (
                401, 403), path
