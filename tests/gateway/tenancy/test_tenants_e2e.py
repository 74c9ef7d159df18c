"""Auth and visibility end to end: the real gateway with a tenants file, called by
tritonclient sending the key as metadata, and by our stubs for every RPC of the service."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.tenancy.auth import Authenticator
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc
from tests.gateway.tenancy.test_tenants import admin, issue
from tests.support import models
from tests.support.gateway import RunningGateway, running_gateway
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
ANONYMOUS_OK = {"ServerLive", "ServerReady"}
GRACE_S = 60


@dataclass
class Keys:
    acme: str
    revoked: str
    rotated: str  # valid for GRACE_S after the rotation, then not
    other: str
    pinned: str
    vip: str  # priority 9: the batcher gets the lowest level the model has
    rotated_window: tuple[float, float] = (0.0, 0.0)  # wall time just before/after rotating


@pytest.fixture(scope="module")
def tenants_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Keys]:
    path = tmp_path_factory.mktemp("tenants") / "tenants.toml"
    admin(path, "create", "acme", "--models", "iris", "prio")
    admin(path, "create", "other", "--models", "digits")
    admin(path, "create", "pinned", "--models", "iris:1")
    admin(path, "create", "vip", "--models", "prio", "--priority", "9")
    rotated = issue(path, "acme")
    before = time.time()
    acme = issue(path, "acme", "rotate", "--grace-s", str(GRACE_S))
    after = time.time()
    revoked = issue(path, "acme")
    key_id = [k for k in admin(path, "list")[1].split() if len(k) == 8 and k.isalnum()][-1]
    assert admin(path, "revoke", "acme", "--key", key_id)[0] == 0
    keys = Keys(acme=acme, revoked=revoked, rotated=rotated, other=issue(path, "other"),
                pinned=issue(path, "pinned"), vip=issue(path, "vip"),
                rotated_window=(before, after))
    return path, keys


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    demo = Path(__file__).resolve().parents[3] / "gateway" / "demo_store"
    for name in ("iris", "digits"):
        for version_dir in (demo / name).iterdir():
            if version_dir.is_dir():
                models.write_model(root, name, int(version_dir.name),
                                   (version_dir / "model.onnx").read_bytes(),
                                   (demo / name / "config.pbtxt").read_text())
    models.write_model(root, "prio", 1, models.add_constant(1.0), models.add_model_config(
        "prio", extra="dynamic_batching { priority_levels: 2 default_priority_level: 2 }\n"))
    return root


@pytest.fixture(scope="module")
def gateway(tenants_file: tuple[Path, Keys], store: Path) -> Iterator[RunningGateway]:
    with running_gateway(store, tenants=tenants_file[0]) as gw:
        yield gw


@pytest.fixture(scope="module")
def keys(tenants_file: tuple[Path, Keys]) -> Keys:
    return tenants_file[1]


@pytest.fixture(scope="module")
def client(gateway: RunningGateway) -> Iterator[tc.InferenceServerClient]:
    with tc.InferenceServerClient(gateway.target) as c:
        yield c


@pytest.fixture
def later(gateway: RunningGateway, keys: Keys) -> Iterator[Callable[[float], None]]:
    """Stop the authenticator's clock ``seconds`` after the rotation (no sleeping through a
    grace period, and no dependence on how long the tests before took). Inside the grace
    period the clock counts from just before the rotation, past it from just after, so the
    answer holds whenever exactly the rotation happened."""
    authenticator: Authenticator = gateway.gateway.authenticator
    before, after = keys.rotated_window

    def move(seconds: float) -> None:
        frozen = (before if seconds < GRACE_S else after) + seconds
        authenticator.clock = lambda: frozen

    yield move
    authenticator.clock = time.time


def iris_input() -> tc.InferInput:
    x = tc.InferInput("features", [1, 4], "FP32")
    x.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
    return x


# Every RPC tritonclient offers on a model, as (name, call(client, model, headers)).
RPCS: list[tuple[str, Callable[[tc.InferenceServerClient, str, dict[str, str]], Any]]] = [
    ("ServerMetadata", lambda c, m, h: c.get_server_metadata(headers=h)),
    ("ModelReady", lambda c, m, h: c.is_model_ready(m, headers=h)),
    ("ModelMetadata", lambda c, m, h: c.get_model_metadata(m, headers=h)),
    ("ModelConfig", lambda c, m, h: c.get_model_config(m, headers=h)),
    ("RepositoryIndex", lambda c, m, h: c.get_model_repository_index(headers=h)),
    ("ModelStatistics", lambda c, m, h: c.get_inference_statistics(m, headers=h)),
    ("ModelInfer", lambda c, m, h: c.infer(m, [iris_input()], headers=h)),
]
RPC_IDS = [name for name, _ in RPCS]


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def status_of(call: Callable[[], Any]) -> str:
    try:
        call()
    except tc.InferenceServerException as exc:
        return str(exc.status())
    return "OK"


@pytest.mark.parametrize(("name", "rpc"), RPCS, ids=RPC_IDS)
def test_rpc_without_a_valid_key_is_unauthenticated(
    client: tc.InferenceServerClient, keys: Keys, name: str,
    rpc: Callable[..., Any], later: Callable[[float], None],
) -> None:
    for headers in ({}, bearer("mg_acme_" + "x" * 40), bearer(keys.revoked),
                    {"authorization": keys.acme}, {"x-api-key": ""}):
        assert status_of(partial(rpc, client, "iris", headers)) == (
            "StatusCode.UNAUTHENTICATED"
        )
    later(GRACE_S + 1)
    assert status_of(lambda: rpc(client, "iris", bearer(keys.rotated))) == (
        "StatusCode.UNAUTHENTICATED"
    )
    assert status_of(lambda: rpc(client, "iris", bearer(keys.acme))) == "OK"


@pytest.mark.parametrize(("name", "rpc"), RPCS, ids=RPC_IDS)
def test_rpc_with_current_or_rotated_key_in_its_grace_period_works(
    client: tc.InferenceServerClient, keys: Keys, name: str,
    rpc: Callable[..., Any], later: Callable[[float], None],
) -> None:
    later(GRACE_S - 1)
    for headers in (bearer(keys.acme), bearer(keys.rotated), {"x-api-key": keys.acme}):
        assert status_of(partial(rpc, client, "iris", headers)) == "OK"


@pytest.mark.parametrize(("name", "rpc"), RPCS, ids=RPC_IDS)
def test_another_tenants_model_looks_exactly_like_an_unknown_one(
    client: tc.InferenceServerClient, keys: Keys, name: str, rpc: Callable[..., Any],
) -> None:
    headers = bearer(keys.acme)

    def outcome(model: str) -> str:
        try:
            result = rpc(client, model, headers)
        except tc.InferenceServerException as exc:
            return f"{exc.status()} {exc.message()}".replace(model, "<model>")
        if name == "RepositoryIndex":
            return str(sorted({m.name for m in result.models}))
        return str(result).replace(model, "<model>")

    if name in ("ServerMetadata", "RepositoryIndex"):
        return  # not about one model; the index is checked below
    assert outcome("digits") == outcome("no_such_model")
    assert "NOT_FOUND" in outcome("digits") or name == "ModelReady"
    assert status_of(lambda: rpc(client, "digits", bearer(keys.other))) in (
        "OK", "StatusCode.INVALID_ARGUMENT",  # ModelInfer: digits takes other inputs
    )


def test_repository_index_and_statistics_show_only_the_tenants_models(
    client: tc.InferenceServerClient, keys: Keys
) -> None:
    def names(key: str) -> set[str]:
        return {m.name for m in client.get_model_repository_index(headers=bearer(key)).models}

    assert names(keys.acme) == {"iris", "prio"}
    assert names(keys.other) == {"digits"}
    stats = client.get_inference_statistics(headers=bearer(keys.other))
    assert {s.name for s in stats.model_stats} == {"digits"}


def test_version_pins_hide_other_versions(client: tc.InferenceServerClient, keys: Keys) -> None:
    headers = bearer(keys.pinned)
    index = client.get_model_repository_index(headers=headers)
    assert [(m.name, m.version) for m in index.models] == [("iris", "1")]
    assert client.infer("iris", [iris_input()], headers=headers).get_response().model_version == "1"
    assert client.get_model_metadata("iris", headers=headers).versions == ["1"]
    assert status_of(lambda: client.infer("iris", [iris_input()], model_version="2",
                                          headers=headers)) == "StatusCode.NOT_FOUND"
    assert client.infer("iris", [iris_input()], model_version="2",
                        headers=bearer(keys.acme)).get_response().model_version == "2"


def test_every_rpc_of_the_service_is_behind_auth(gateway: RunningGateway) -> None:
    with grpc.insecure_channel(gateway.target) as channel:
        for method in SERVICE.methods:
            path = f"/{SERVICE.full_name}/{method.name}"
            kinds = (method.client_streaming, method.server_streaming)
            call: Any = {
                (False, False): channel.unary_unary, (True, True): channel.stream_stream,
                (False, True): channel.unary_stream, (True, False): channel.stream_unary,
            }[kinds](path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            request: Any = iter([b""]) if method.client_streaming else b""
            try:
                result = call(request, timeout=10)
                if method.server_streaming:
                    list(result)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
            expected = (grpc.StatusCode.OK if method.name in ANONYMOUS_OK
                        else grpc.StatusCode.UNAUTHENTICATED)
            assert code == expected, method.name


def test_health_and_reflection_answer_without_a_key(gateway: RunningGateway) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(gateway.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(service="iris"), timeout=10).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        services = {s.name for a in answers for s in a.list_services_response.service}
        assert SERVICE.full_name in services
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live


def test_tenant_priority_reaches_the_batcher(
    gateway: RunningGateway, client: tc.InferenceServerClient, keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runtime: Any = gateway.gateway.manager.version("prio", "1").runtime
    seen: list[int] = []
    original = runtime.infer

    async def spy(request: Any) -> Any:
        seen.append(request.priority)
        return await original(request)

    monkeypatch.setattr(runtime, "infer", spy)
    x = tc.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
    client.infer("prio", [x], headers=bearer(keys.acme))  # priority 0: the model default
    client.infer("prio", [x], headers=bearer(keys.vip))  # 9, clamped to the model's 2 levels
    client.infer("prio", [x], headers=bearer(keys.vip), priority=1)  # the request's own
    assert seen == [0, 2, 1]


def test_keys_issued_while_running_work_after_the_file_reloads(
    gateway: RunningGateway, tenants_file: tuple[Path, Keys], client: tc.InferenceServerClient,
) -> None:
    path = tenants_file[0]
    admin(path, "create", "late", "--models", "iris")
    key = issue(path, "late")
    def works() -> bool:
        return status_of(lambda: client.get_model_metadata("iris", headers=bearer(key))) == "OK"

    wait_until(works, "the reload of the tenants file", timeout=10)
    assert admin(path, "revoke", "late")[0] == 0
    wait_until(lambda: not works(), "the reload of the revocation", timeout=10)
