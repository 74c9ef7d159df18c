"""The tenants file, keys and the ``modelgate tenants`` commands, without a server."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest

from gateway.errors import AuthenticationError
from gateway.process import cli
from gateway.quota.store import Limits
from gateway.settings import SettingsError, check_exposure, load_settings
from gateway.tenancy import admin as tenant_admin
from gateway.tenancy.auth import Authenticator
from gateway.tenancy.tenants import (
    TenantRegistry,
    TenantsFileError,
    hash_key,
    key_tenant,
    load_tenants,
    new_key,
    parse_tenants,
)


def admin(path: Path, *argv: str, clock: float | None = None) -> tuple[int, str]:
    """Run ``modelgate tenants --file path ...`` in-process; returns (exit code, stdout)."""
    args = cli._parser().parse_args(["tenants", "--file", str(path), *argv])
    out = io.StringIO()
    code = tenant_admin.run(args, {}, out, clock=(lambda: clock) if clock else None)
    return code, out.getvalue()


def issue(path: Path, tenant: str, *argv: str, clock: float | None = None) -> str:
    code, out = admin(path, "issue-key" if not argv else argv[0], tenant, *argv[1:], clock=clock)
    assert code == 0
    return out.splitlines()[0]


def test_keys_are_shaped_for_leak_scanners_and_parse_back() -> None:
    key, key_id = new_key("acme-1")
    assert key.startswith("mg_acme-1_") and len(key) > 40
    assert key_tenant(key) == "acme-1"
    assert key_id.isalnum()
    for bad in ("", "acme", "mg_", "mg_acme", "mg_acme_short", "mg_ACME_" + "a" * 40,
                "xx_acme_" + "a" * 40):
        assert key_tenant(bad) is None


def test_file_stores_hashes_only_and_list_prints_no_secret(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    assert admin(path, "create", "acme", "--models", "iris", "digits*", "--priority", "2",
                 "--requests-per-s", "5", "--concurrent", "2")[0] == 0
    key = issue(path, "acme")
    text = path.read_text()
    assert key not in text and key.split("_")[-1] not in text
    assert hash_key(key) in text
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    code, listing = admin(path, "list")
    assert code == 0 and key not in listing and "sha256" not in listing
    assert "acme" in listing and "active" in listing
    tenant = load_tenants(path)["acme"]
    assert tenant.priority == 2
    assert tenant.limits == Limits(requests_per_s=5.0, concurrent=2)
    assert tenant.can_see("iris") and tenant.can_see("digits_unbatched")
    assert not tenant.can_see("species")


def test_rotate_keeps_old_key_for_the_grace_period_then_not(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    admin(path, "create", "acme")
    now = 2_000_000_000.0
    old = issue(path, "acme", clock=now)
    new = issue(path, "acme", "rotate", "--grace-s", "60", clock=now)
    registry = TenantRegistry(path)
    auth = Authenticator(registry, clock=lambda: now + 59)
    assert auth.authenticate([("authorization", f"Bearer {old}")]).id == "acme"
    assert auth.authenticate([("x-api-key", new)]).id == "acme"
    auth.clock = lambda: now + 61
    with pytest.raises(AuthenticationError):
        auth.authenticate([("authorization", f"Bearer {old}")])
    assert auth.authenticate([("authorization", f"bearer {new}")]).id == "acme"
    assert "expired" in admin(path, "list", clock=now + 61)[1]


def test_revoke_one_key_or_all(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    admin(path, "create", "acme")
    first, second = issue(path, "acme"), issue(path, "acme")
    key_id = next(k.id for k in load_tenants(path)["acme"].keys if k.hash == hash_key(first))
    assert admin(path, "revoke", "acme", "--key", key_id)[0] == 0
    auth = Authenticator(TenantRegistry(path))
    with pytest.raises(AuthenticationError, match="invalid API key"):
        auth.authenticate([("x-api-key", first)])
    assert auth.authenticate([("x-api-key", second)]).id == "acme"
    assert admin(path, "revoke", "acme")[0] == 0
    auth.registry = TenantRegistry(path)
    with pytest.raises(AuthenticationError):
        auth.authenticate([("x-api-key", second)])
    assert admin(path, "revoke", "nobody")[0] == 1


def test_a_remembered_key_stops_working_when_a_reload_revokes_it(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    admin(path, "create", "acme")
    key = issue(path, "acme")
    registry = TenantRegistry(path)
    auth = Authenticator(registry)
    for _ in range(3):  # authenticated once, then answered from memory
        assert auth.authenticate([("x-api-key", key)]).id == "acme"
    assert admin(path, "revoke", "acme")[0] == 0
    assert registry.reload_if_changed()
    with pytest.raises(AuthenticationError, match="invalid API key"):
        auth.authenticate([("x-api-key", key)])


def test_rejections_never_say_which_tenant_or_key_exists(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    admin(path, "create", "acme")
    key = issue(path, "acme")
    auth = Authenticator(TenantRegistry(path))
    messages = set()
    for metadata in (
        # known tenant, wrong secret (the last character changed, whatever it was)
        [("authorization", "Bearer " + key[:-1] + ("y" if key.endswith("x") else "x"))],
        [("authorization", "Bearer " + key.replace("acme", "nobody"))],  # unknown tenant
        [("x-api-key", "garbage")],
    ):
        with pytest.raises(AuthenticationError) as info:
            auth.authenticate(metadata)
        messages.add(str(info.value))
    assert messages == {"invalid API key or client certificate"}
    with pytest.raises(AuthenticationError, match="missing API key"):
        auth.authenticate([("authorization", "Basic abc")])


def test_open_mode_is_one_anonymous_tenant() -> None:
    tenant = Authenticator(None).authenticate([])
    assert tenant.id == "anonymous" and tenant.can_see("anything")
    assert tenant.scopes("anything") == ()


def test_client_subject_binding_is_order_insensitive(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    admin(path, "create", "acme", "--client-subject", "CN=acme-client,O=Acme")
    key = issue(path, "acme")
    auth = Authenticator(TenantRegistry(path))
    metadata = [("x-api-key", key)]
    assert auth.authenticate(metadata, "O=Acme,CN=acme-client").id == "acme"
    for subject in (None, "O=Acme,CN=other"):
        with pytest.raises(AuthenticationError):
            auth.authenticate(metadata, subject)


def test_model_grants_pin_versions() -> None:
    tenants = parse_tenants({"tenants": {"t": {"models": ["iris:2", "iris:1", "dig*"]}}})
    tenant = tenants["t"]
    assert tenant.allows("iris", "2") and tenant.allows("iris", "1")
    assert not tenant.allows("iris", "3") and not tenant.allows("iris", "")
    assert tenant.effective_version("iris", "") == "2"
    assert tenant.effective_version("digits", "") == ""
    assert tenant.visible_versions("iris", [1, 2, 3]) == [1, 2]
    assert tenant.allows("digits", "") and not tenant.can_see("species")


def test_scopes_per_tenant_and_per_model() -> None:
    tenant = parse_tenants({"tenants": {"t": {
        "models": ["*"], "limits": {"requests_per_s": 10},
        "model_limits": {"iris": {"rows_per_s": 100}},
    }}})["t"]
    assert [s.key for s in tenant.scopes("iris")] == ["t:t", "m:t:iris"]
    assert [s.key for s in tenant.scopes("digits")] == ["t:t"]
    assert tenant.scopes("iris")[1].label == "model=iris"


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ({"tenants": {"Bad_Id": {}}}, "ids are"),
        ({"tenants": {"anonymous": {}}}, "ids are"),
        ({"tenants": {"t": {"colour": 1}}}, "unknown key"),
        ({"tenants": {"t": {"priority": -1}}}, "priority"),
        ({"tenants": {"t": {"models": "iris"}}}, "models"),
        ({"tenants": {"t": {"models": ["iris:2:3"]}}}, "model 'iris:2:3'"),
        ({"tenants": {"t": {"limits": {"requests_per_s": 0}}}}, "requests_per_s"),
        ({"tenants": {"t": {"limits": {"burst": 5}}}}, "burst needs"),
        ({"tenants": {"t": {"keys": [{"id": "a", "hash": "md5:x"}]}}}, "hash"),
        ({"other": 1}, "top-level"),
    ],
)
def test_invalid_files_name_the_problem(doc: dict[str, object], problem: str) -> None:
    with pytest.raises(TenantsFileError, match=problem):
        parse_tenants(doc)


def test_registry_reloads_good_edits_and_keeps_tenants_over_bad_ones(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    admin(path, "create", "acme")
    registry = TenantRegistry(path)
    assert not registry.reload_if_changed()
    admin(path, "create", "beta")
    assert registry.reload_if_changed() and set(registry.tenants) == {"acme", "beta"}
    path.write_text("this is [not toml")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert not registry.reload_if_changed()
    assert set(registry.tenants) == {"acme", "beta"}


def test_edit_refuses_to_write_an_invalid_file(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    assert admin(path, "create", "bad_id")[0] == 1
    assert not path.exists()
    assert not list(tmp_path.glob(".tenants.toml.*.tmp"))


def test_settings_refuse_an_open_gateway_on_a_public_address(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="no tenants file"):
        check_exposure(load_settings(None, {}, {"host": "0.0.0.0"}))
    settings = load_settings(None, {}, {"host": "0.0.0.0", "allow_anonymous": True})
    check_exposure(settings)
    settings = load_settings(None, {"MODELGATE_ALLOW_ANONYMOUS": "true"}, {"host": "::"})
    check_exposure(settings)
    path = tmp_path / "t.toml"
    admin(path, "create", "acme")
    settings = load_settings(None, {}, {"host": "0.0.0.0", "tenants": str(path)})
    assert settings.tenants == path
    check_exposure(settings)
    for host in ("localhost", "127.0.0.2", "::1", "[::1]"):
        check_exposure(load_settings(None, {}, {"host": host}))
    with pytest.raises(SettingsError, match="redis_failure_mode"):
        load_settings(None, {"MODELGATE_REDIS_FAILURE_MODE": "maybe"}, {})
    with pytest.raises(SettingsError, match="redis_url"):
        load_settings(None, {}, {"redis_url": "http://x"})
    with pytest.raises(SettingsError, match="tls_key"):
        load_settings(None, {}, {"tls_cert": str(path)})


def test_cli_serve_exits_2_on_a_public_address_without_tenants(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["serve", "--host", "0.0.0.0", "--grpc-port", "0"]) == 2
    assert "--allow-anonymous" in capsys.readouterr().err


def test_cli_serve_exits_2_on_an_invalid_tenants_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t.toml"
    path.write_text("[tenants.x]\npriority = 'high'\n")
    assert cli.main(["serve", "--grpc-port", "0", "--metrics-port", "0",
                     "--tenants", str(path)]) == 2
    assert "priority" in capsys.readouterr().err
