"""TLS and mutual TLS on the gRPC port with certificates made by the test (cryptography):
plain TLS, required client certificates, tenants bound to a subject, reload on change."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as tc

from gateway.settings import SettingsError, load_settings
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc
from tests.gateway.tenancy.test_tenants import admin, issue
from tests.support.certs import CertificateAuthority, Pem
from tests.support.gateway import running_gateway

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


@pytest.fixture
def server_files(tmp_path: Path, ca: CertificateAuthority) -> tuple[Path, Path, Path]:
    cert, key = ca.issue("localhost", server=True).write(tmp_path, "server")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.pem)
    return cert, key, ca_file


def metadata_status(target: str, root: bytes, client: Pem | None = None,
                    key: str | None = None) -> grpc.StatusCode:
    """ServerMetadata over a fresh TLS channel; returns the status code."""
    creds = grpc.ssl_channel_credentials(
        root, client.key if client else None, client.cert if client else None
    )
    # A fresh channel per call: a new handshake, so reloaded certificates are seen.
    with grpc.secure_channel(target, creds, options=[("grpc.use_local_subchannel_pool", 1)]
                             ) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10,
                                metadata=(("x-api-key", key),) if key else None)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_tls_serves_encrypted_and_refuses_plaintext(
    server_files: tuple[Path, Path, Path], ca: CertificateAuthority
) -> None:
    cert, key, _ = server_files
    with running_gateway(tls_cert=cert, tls_key=key) as gw:
        assert metadata_status(gw.target, ca.pem) == grpc.StatusCode.OK
        with grpc.insecure_channel(gw.target) as channel:
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.GRPCInferenceServiceStub(channel).ServerMetadata(
                    pb.ServerMetadataRequest(), timeout=10
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # A client that trusts another CA does not get through.
        assert metadata_status(gw.target, CertificateAuthority("other").pem) == (
            grpc.StatusCode.UNAVAILABLE
        )


def test_mtls_requires_a_client_certificate_from_the_ca(
    server_files: tuple[Path, Path, Path], ca: CertificateAuthority
) -> None:
    cert, key, ca_file = server_files
    with running_gateway(tls_cert=cert, tls_key=key, tls_client_ca=ca_file) as gw:
        assert metadata_status(gw.target, ca.pem, ca.issue("anyone")) == grpc.StatusCode.OK
        assert metadata_status(gw.target, ca.pem) == grpc.StatusCode.UNAVAILABLE
        stranger = CertificateAuthority("stranger").issue("anyone")
        assert metadata_status(gw.target, ca.pem, stranger) == grpc.StatusCode.UNAVAILABLE


def test_tenant_bound_to_a_subject_needs_key_and_certificate(
    server_files: tuple[Path, Path, Path], ca: CertificateAuthority, tmp_path: Path
) -> None:
    cert, key, ca_file = server_files
    path = tmp_path / "tenants.toml"
    admin(path, "create", "bound", "--models", "iris", "--client-subject",
          "CN=acme-client,O=Acme")
    admin(path, "create", "loose", "--models", "iris")
    bound, loose = issue(path, "bound"), issue(path, "loose")
    right = ca.issue("acme-client", org="Acme")
    wrong = ca.issue("intruder", org="Acme")
    with running_gateway(tls_cert=cert, tls_key=key, tls_client_ca=ca_file, tenants=path) as gw:
        assert metadata_status(gw.target, ca.pem, right, bound) == grpc.StatusCode.OK
        assert metadata_status(gw.target, ca.pem, wrong, bound) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert metadata_status(gw.target, ca.pem, wrong, loose) == grpc.StatusCode.OK
        assert metadata_status(gw.target, ca.pem, right) == grpc.StatusCode.UNAUTHENTICATED
        # tritonclient over mTLS, sending the key as a header.
        files = {name: tmp_path / f"{name}.pem" for name in ("root", "key", "chain")}
        files["root"].write_bytes(ca.pem)
        files["key"].write_bytes(right.key)
        files["chain"].write_bytes(right.cert)
        with tc.InferenceServerClient(
            gw.target, ssl=True, root_certificates=str(files["root"]),
            private_key=str(files["key"]), certificate_chain=str(files["chain"]),
        ) as client:
            index = client.get_model_repository_index(headers={"authorization": f"Bearer {bound}"})
            assert {m.name for m in index.models} == {"iris"}


def test_certificates_reload_when_the_files_change(
    server_files: tuple[Path, Path, Path], ca: CertificateAuthority, tmp_path: Path
) -> None:
    cert, key, _ = server_files
    renewed_ca = CertificateAuthority("renewed CA")
    with running_gateway(tls_cert=cert, tls_key=key) as gw:
        assert metadata_status(gw.target, ca.pem) == grpc.StatusCode.OK
        assert metadata_status(gw.target, renewed_ca.pem) == grpc.StatusCode.UNAVAILABLE
        new_cert, new_key = renewed_ca.issue("localhost", server=True).write(tmp_path, "new")
        # As certificate tooling does: write aside, then rename over the served files.
        os.replace(new_key, key)
        os.replace(new_cert, cert)
        assert metadata_status(gw.target, renewed_ca.pem) == grpc.StatusCode.OK
        assert metadata_status(gw.target, ca.pem) == grpc.StatusCode.UNAVAILABLE


def test_tls_settings_come_in_pairs(server_files: tuple[Path, Path, Path]) -> None:
    cert, key, ca_file = server_files
    with pytest.raises(SettingsError, match="tls_client_ca"):
        load_settings(None, {}, {"tls_client_ca": str(ca_file)})
    with pytest.raises(SettingsError, match="give both"):
        load_settings(None, {"MODELGATE_TLS_KEY": str(key)}, {})
    settings = load_settings(None, {}, {"tls_cert": str(cert), "tls_key": str(key)})
    assert settings.tls_cert == cert and settings.tls_client_ca is None


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # gRPC honours *_proxy variables; loopback calls must never go through one.
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "grpc_proxy"):
        monkeypatch.delenv(name, raising=False)
    yield
