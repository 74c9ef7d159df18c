"""RepositoryModelLoad / RepositoryModelUnload end to end: refused when model control is off,
refused without an admin tenant's key, and for admins: unload drains, load re-reads the
store at once, never takes a path, and reports versions that fail."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from gateway.settings import SettingsError, load_settings
from gateway.tenancy.tenants import hash_key, new_key
from modelgate_pb import grpc_service_pb2 as pb
from tests.support import models
from tests.support.gateway import GatewayProcess, RunningGateway, running_gateway
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)
ALL_VERSIONS = "version_policy: { all {} }\n"


@dataclass
class Keys:
    admin: str
    user: str


def write_tenants(path: Path) -> Keys:
    admin, _ = new_key("ops")
    user, _ = new_key("app")
    path.write_text(
        "[tenants.ops]\nadmin = true\nmodels = ['*']\n"
        f"[[tenants.ops.keys]]\nid = 'k1'\nhash = '{hash_key(admin)}'\n"
        "[tenants.app]\nmodels = ['*']\n"
        f"[[tenants.app.keys]]\nid = 'k2'\nhash = '{hash_key(user)}'\n",
        encoding="utf-8",
    )
    return Keys(admin=admin, user=user)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    models.write_model(root, "adder", 1, models.add_constant(1.0),
                       models.add_model_config("adder", extra=ALL_VERSIONS))
    return root


@pytest.fixture()
def controlled(store: Path, tmp_path: Path) -> Iterator[tuple[RunningGateway, Keys]]:
    keys = write_tenants(tmp_path / "tenants.toml")
    with running_gateway(store, tenants=tmp_path / "tenants.toml",
                         enable_model_control=True) as gw:
        yield gw, keys


def refused(action: object, *args: object, **kwargs: object) -> InferenceServerException:
    assert callable(action)
    with pytest.raises(InferenceServerException) as info:
        action(*args, **kwargs)
    return info.value


def answer(client: tc.InferenceServerClient, key: str, version: str = "") -> str:
    tensor = tc.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
    result = client.infer("adder", [tensor], model_version=version, headers=bearer(key))
    return str(result.get_response().model_version)


def test_model_control_is_refused_when_disabled(store: Path) -> None:
    # Without a tenants file every caller is the (admin) anonymous tenant: the flag alone
    # decides, and it is off by default.
    with running_gateway(store) as gw, tc.InferenceServerClient(gw.target) as client:
        for action in (client.load_model, client.unload_model):
            error = refused(action, "adder")
            assert error.status() == "StatusCode.FAILED_PRECONDITION"
            assert "--enable-model-control" in error.message()
        assert client.is_model_ready("adder")


def test_model_control_is_refused_without_the_admin_key(
    controlled: tuple[RunningGateway, Keys],
) -> None:
    gw, keys = controlled
    with tc.InferenceServerClient(gw.target) as client:
        for action in (client.load_model, client.unload_model):
            assert refused(action, "adder").status() == "StatusCode.UNAUTHENTICATED"
            assert refused(action, "adder", headers=bearer("mg_ops_" + "x" * 40)).status() == (
                "StatusCode.UNAUTHENTICATED"
            )
            error = refused(action, "adder", headers=bearer(keys.user))
            assert error.status() == "StatusCode.PERMISSION_DENIED"
        assert answer(client, keys.user) == "1"  # nothing was unloaded


def test_admin_unloads_and_loads_a_model(controlled: tuple[RunningGateway, Keys]) -> None:
    gw, keys = controlled
    admin = bearer(keys.admin)
    with tc.InferenceServerClient(gw.target) as client:
        client.unload_model("adder", headers=admin)
        assert not client.is_model_ready("adder", headers=admin)
        index = gw.stub().RepositoryIndex(pb.RepositoryIndexRequest(),
                                          metadata=tuple(admin.items()), timeout=10)
        (entry,) = [m for m in index.models if m.name == "adder"]
        assert (entry.state, entry.reason) == ("UNAVAILABLE", "unloaded by RepositoryModelUnload")
        error = refused(answer, client, keys.user)
        assert error.status() == "StatusCode.UNAVAILABLE"
        # A new version written meanwhile is picked up by the load at once (no polling).
        models.write_model(gw.gateway.settings.store, "adder", 2, models.add_constant(2.0),
                           None)
        client.load_model("adder", headers=admin)
        assert client.is_model_ready("adder", "1", headers=admin)
        assert answer(client, keys.user) == "2"


def test_load_takes_no_path_and_checks_the_name(controlled: tuple[RunningGateway, Keys]) -> None:
    gw, keys = controlled
    admin = bearer(keys.admin)
    with tc.InferenceServerClient(gw.target) as client:
        error = refused(client.load_model, "adder", headers=admin, config='{"backend": "x"}')
        assert error.status() == "StatusCode.INVALID_ARGUMENT"
        error = refused(client.load_model, "adder", headers=admin,
                        files={"file:1/model.onnx": b"not onnx"})
        assert error.status() == "StatusCode.INVALID_ARGUMENT"
        for name in ("../adder", "/etc", "nope"):
            assert refused(client.load_model, name, headers=admin).status() == (
                "StatusCode.NOT_FOUND"
            )
            assert refused(client.unload_model, name, headers=admin).status() == (
                "StatusCode.NOT_FOUND"
            )
        assert answer(client, keys.user) == "1"


def test_load_reports_a_broken_version_while_the_others_serve(
    controlled: tuple[RunningGateway, Keys],
) -> None:
    gw, keys = controlled
    models.write_model(gw.gateway.settings.store, "adder", 3, b"garbage", None)
    with tc.InferenceServerClient(gw.target) as client:
        error = refused(client.load_model, "adder", headers=bearer(keys.admin))
        assert error.status() == "StatusCode.UNAVAILABLE"
        assert "version 3" in error.message() and "load failed" in error.message()
        assert answer(client, keys.user) == "1"
        assert not client.is_model_ready("adder", "3", headers=bearer(keys.user))


def test_the_cli_flags_poll_and_allow_model_control(store: Path) -> None:
    args = ["--store", str(store), "--metrics-port", "0", "--poll-interval", "0.1",
            "--enable-model-control"]
    with GatewayProcess(args) as proc, tc.InferenceServerClient(proc.target) as client:
        models.write_model(store, "adder", 2, models.add_constant(2.0), None)
        wait_until(lambda: client.is_model_ready("adder", "2"), "version 2 ready")
        client.unload_model("adder")
        assert not client.is_model_ready("adder")
        client.load_model("adder")
        assert client.is_model_ready("adder", "2")
        proc.stop()


def test_a_bad_poll_interval_names_the_setting() -> None:
    with pytest.raises(SettingsError, match="setting 'poll_interval'"):
        load_settings(None, {"MODELGATE_POLL_INTERVAL": "0.001"}, {})
    assert load_settings(None, {}, {"enable_model_control": True}).enable_model_control
