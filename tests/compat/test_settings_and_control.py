"""What the trace, logging and model-repository extensions change, through tritonclient:
a trace setting decides which requests are exported (per model over the global one), a log
setting moves the server's level, changing either needs an admin tenant (reading does not),
and load/unload work with model control on, on all four clients."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.compat.calls import GRPC, KINDS, Case, _all_types, _args, call, settings_of
from tests.compat.calls import _infer as _infer_add
from tests.compat.conftest import Server
from tests.gateway.tenancy.test_tenants import admin, issue
from tests.support.gateway import running_gateway
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as rx:
        yield rx


def test_trace_settings_decide_what_is_exported_per_model(
    compat_store: Path, receiver: OtlpReceiver,
) -> None:
    """trace extension: global trace_level OFF exports nothing; a model's trace_rate 1
    exports every request of that model while the others stay off; clearing the model's
    setting returns it to the global one."""
    with running_gateway(compat_store, http_port=0, otlp_endpoint=receiver.endpoint) as gw:
        tracing = gw.gateway.tracing
        assert tracing is not None
        client = httpclient.InferenceServerClient(f"127.0.0.1:{gw.gateway.rest_port}")
        try:
            off = client.update_trace_settings(settings={"trace_level": ["OFF"]})
            assert off["trace_level"] == ["OFF"]
            on = client.update_trace_settings(
                model_name="add", settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "1"})
            assert on["trace_level"] == ["TIMESTAMPS"] and on["trace_rate"] == "1"
            assert client.get_trace_settings()["trace_level"] == ["OFF"]

            def infer(model: str) -> None:
                args, kwargs = (_infer_add() if model == "add" else _all_types(True))(
                    httpclient, "http")
                client.infer(*args, **kwargs)

            for _ in range(3):
                infer("add")
            tracing.force_flush()
            spans = receiver.wait_for(
                lambda s: sum(x.name == "POST ModelInfer" for x in s) >= 3)
            traced = [s for s in spans if s.name == "POST ModelInfer"]
            assert {s.attributes.get("modelgate.model.name") for s in traced} == {"add"}
            # The sampler's hint is not left on the span.
            assert all("modelgate.sampling.model" not in s.attributes for s in traced)
            # Another model follows the global OFF: answered, never exported.
            count = len(traced)
            infer("all_types")
            # Cleared: add follows the global OFF again.
            cleared = client.update_trace_settings(
                model_name="add", settings={"trace_level": None, "trace_rate": None})
            assert cleared["trace_level"] == ["OFF"]
            infer("add")
            # A marker request traced afterwards bounds the wait: nothing before it came.
            client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"],
                                                   "sampling_ratio": "1"})
            infer("add")
            tracing.force_flush()
            spans = receiver.wait_for(
                lambda s: sum(x.name == "POST ModelInfer" for x in s) >= count + 1)
            after = [s for s in spans if s.name == "POST ModelInfer"]
            assert len(after) == count + 1
        finally:
            client.close()


@pytest.fixture(scope="module")
def tenants_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    path = tmp_path_factory.mktemp("compat-tenants") / "tenants.toml"
    assert admin(path, "create", "user", "--models", "*")[0] == 0
    assert admin(path, "create", "boss", "--models", "*", "--admin")[0] == 0
    return path, issue(path, "user"), issue(path, "boss")


@pytest.fixture(scope="module")
def guarded(compat_store: Path, tenants_file: tuple[Path, str, str]) -> Iterator[Server]:
    with running_gateway(compat_store, http_port=0, tenants=tenants_file[0],
                         enable_model_control=True) as gw:
        yield Server(gw.target, f"127.0.0.1:{gw.gateway.rest_port}")


@pytest.mark.parametrize("kind", KINDS)
def test_reading_settings_takes_a_key_changing_them_an_admin(
    guarded: Server, tenants_file: tuple[Path, str, str], kind: str,
) -> None:
    """trace and logging extensions, as model control: reads for every tenant, changes
    (server state for all tenants) for admins only."""
    _, user, boss = tenants_file
    as_user = {"authorization": f"Bearer {user}"}
    as_boss = {"x-api-key": boss}
    json_kw = {"as_json": True} if kind in GRPC else {}

    def case(method: str, headers: dict[str, str], **kwargs: object) -> Case:
        return Case(method, method, lambda module, k: ((), {**kwargs, **json_kw,
                                                            "headers": headers}))

    assert not call(guarded, kind, case("get_trace_settings", as_user)).failed
    assert not call(guarded, kind, case("get_log_settings", as_user)).failed
    denied = {"grpc": "StatusCode.PERMISSION_DENIED", "http": "403"}["grpc" if kind in GRPC
                                                                      else "http"]
    refused = call(guarded, kind, case("update_trace_settings", as_user,
                                       settings={"trace_rate": "10"}))
    assert refused.status == denied and "admin" in refused.message
    refused = call(guarded, kind, case("update_log_settings", as_user,
                                       settings={"log_verbose_level": 0}))
    assert refused.status == denied
    changed = call(guarded, kind, case("update_trace_settings", as_boss,
                                       settings={"trace_rate": "10"}))
    assert settings_of(changed.answer, kind)["trace_rate"] in ("10", ["10"])
    missing = call(guarded, kind, case("get_trace_settings", {}))
    assert missing.status in ("StatusCode.UNAUTHENTICATED", "401")


def test_log_settings_move_the_servers_level(modelgate: Server) -> None:
    """logging extension: log_verbose_level 1 is DEBUG, log_info false with warnings on is
    WARNING; log_level names a level directly."""
    root = logging.getLogger()
    before = root.level
    client = grpcclient.InferenceServerClient(modelgate.grpc)
    try:
        verbose = client.update_log_settings({"log_verbose_level": 1}, as_json=True)
        assert root.getEffectiveLevel() == logging.DEBUG
        assert settings_of(verbose, "grpc")["log_verbose_level"] == 1
        client.update_log_settings({"log_verbose_level": 0, "log_info": False,
                                    "log_warning": True}, as_json=True)
        assert root.getEffectiveLevel() == logging.WARNING
        http = httpclient.InferenceServerClient(modelgate.http)
        try:
            named = http.update_log_settings({"log_level": "ERROR"})
            assert named["log_level"] == "ERROR" and named["log_warning"] is False
            assert root.getEffectiveLevel() == logging.ERROR
            with pytest.raises(InferenceServerException, match="log_level must be one of"):
                http.update_log_settings({"log_level": "LOUD"})
        finally:
            http.close()
    finally:
        root.setLevel(before)
        client.close()


@pytest.mark.parametrize("kind", KINDS)
def test_load_and_unload_with_model_control_on(modelgate_control: Server, kind: str) -> None:
    """model_repository extension: unload stops serving the model (not ready, absent from
    the ready index); load serves it again; an unknown model cannot be loaded."""
    def ready() -> bool:
        outcome = call(modelgate_control, kind, Case("ready", "is_model_ready", _args("add")))
        return bool(outcome.answer)

    assert not call(modelgate_control, kind,
                    Case("unload", "unload_model", _args("add"))).failed
    wait_until(lambda: not ready(), "add unloaded", timeout=30)
    assert not call(modelgate_control, kind, Case("load", "load_model", _args("add"))).failed
    wait_until(ready, "add loaded again", timeout=60)
    unknown = call(modelgate_control, kind, Case("load", "load_model", _args("nope")))
    assert unknown.failed and unknown.status in ("StatusCode.NOT_FOUND", "404",
                                                 "StatusCode.INVALID_ARGUMENT", "400")
