"""The REST port keeps gRPC's contract: API keys from either header, one case per HTTP status
of the table, quotas shared with gRPC calls of the same tenant, metrics and the access log
labelled with the protocol, and TLS with client certificates (mTLS)."""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper

from tests.gateway.http.conftest import Answer, Keys, rest
from tests.gateway.tenancy.test_tenants import admin, issue
from tests.support import models
from tests.support.certs import CertificateAuthority
from tests.support.gateway import RunningGateway, running_gateway
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(180)

INFER = "/v2/models/add/versions/1/infer"
GOOD = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


def reshape_model() -> bytes:
    """y = reshape(x, [2, 2]) on FP32 [-1, 4], unbatched: one row runs, two fail inside
    ONNX Runtime (a runtime failure, not a bad request)."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [2, 2])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])], initializer=[shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return bytes(model.SerializeToString())


@pytest.fixture(scope="module")
def guarded(rest_store: Path, rest_keys: Keys, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[RunningGateway, Path]]:
    """Tenants on, model control on, an access log; plus ``reshape`` (fails at run time)
    and ``broken`` (its model file does not load)."""
    root = tmp_path_factory.mktemp("contract-store")
    for child in rest_store.iterdir():
        (root / child.name).symlink_to(child)
    models.write_model(root, "reshape", 1, reshape_model(), models.config_pbtxt(
        "reshape", [("x", "FP32", [-1, 4])], [("y", "FP32", [2, 2])], max_batch_size=0))
    models.write_model(root, "broken", 1, b"not an onnx model", models.add_model_config(
        "broken"))
    log = root.parent / "access.log"
    with running_gateway(root, http_port=0, tenants=rest_keys.path, enable_model_control=True,
                         access_log=str(log)) as gateway:
        yield gateway, log


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def error(answer: Answer, status: int) -> str:
    assert answer.status == status, (answer, status)
    message = json.loads(answer.body)["error"]
    assert isinstance(message, str) and message
    return message


def test_keys_come_from_either_header(guarded: tuple[RunningGateway, Path],
                                      rest_keys: Keys) -> None:
    port = guarded[0].gateway.rest_port
    assert rest(port, "POST", INFER, GOOD, bearer(rest_keys.user)).status == 200
    assert rest(port, "POST", INFER, GOOD, {"x-api-key": rest_keys.user}).status == 200
    # Probes need no key; everything else does.
    assert rest(port, "GET", "/v2/health/ready").status == 200
    assert rest(port, "GET", "/v2/health/live").status == 200


def test_one_case_per_status(guarded: tuple[RunningGateway, Path], rest_keys: Keys) -> None:
    port = guarded[0].gateway.rest_port
    user = bearer(rest_keys.user)
    # 400: a bad request.
    assert "needs 4 elements" in error(rest(port, "POST", INFER, {"inputs": [
        {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1]}]}, user), 400)
    # 401: no key, or a wrong one, with the same message for every wrong one.
    missing = rest(port, "POST", INFER, GOOD)
    assert "missing API key" in error(missing, 401)
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert "invalid API key" in error(rest(port, "GET", "/v2", None,
                                           bearer("mg_user_" + "A" * 40)), 401)
    # 403: model control by a tenant that is not an admin; an admin gets through.
    assert "admin" in error(rest(port, "POST", "/v2/repository/models/add/unload",
                                 None, user), 403)
    assert rest(port, "POST", "/v2/repository/models/add/load", None,
                bearer(rest_keys.boss)).status == 200
    # 404: an unknown model.
    assert "unknown model" in error(rest(port, "GET", "/v2/models/nope", None, user), 404)
    # 413: over max_message_bytes (64 MiB here): refused from Content-Length, unread.
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest("POST", INFER)
        connection.putheader("Content-Length", str(1 << 27))
        connection.putheader("Authorization", f"Bearer {rest_keys.user}")
        connection.endheaders()
        answer = connection.getresponse()
        assert answer.status == 413 and b"over the limit" in answer.read()
    finally:
        connection.close()
    # 500: the model fails while it runs.
    rows = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [0] * 8}]}
    assert error(rest(port, "POST", "/v2/models/reshape/infer", rows, user), 500)
    one = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0] * 4}]}
    assert rest(port, "POST", "/v2/models/reshape/infer", one, user).status == 200
    # 503: the version cannot be served (its model file did not load).
    assert error(rest(port, "POST", "/v2/models/broken/infer", GOOD, user), 503)
    # 504: the caller's deadline passed before the request ran.
    late = rest(port, "POST", "/v2/models/batched/infer", GOOD,
                {**user, "x-request-timeout-ms": "0"})
    assert "deadline" in error(late, 504)


def test_quota_is_shared_with_grpc_and_named_in_429(
    guarded: tuple[RunningGateway, Path], rest_keys: Keys
) -> None:
    gateway = guarded[0]
    port = gateway.gateway.rest_port
    metered = bearer(rest_keys.metered)
    x = grpcclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
    client = grpcclient.InferenceServerClient(gateway.target)
    try:
        # A burst of three: two gRPC calls and one REST call use it up.
        for _ in range(2):
            client.infer("add", [x], model_version="1", headers={"x-api-key": rest_keys.metered})
        assert rest(port, "POST", INFER, GOOD, metered).status == 200
        refused = rest(port, "POST", INFER, GOOD, metered)
        assert "quota" in error(refused, 429) or "limit" in error(refused, 429)
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.headers["modelgate-limit"]
        with pytest.raises(Exception) as grpc_refused:
            client.infer("add", [x], model_version="1", headers={"x-api-key": rest_keys.metered})
        assert "RESOURCE_EXHAUSTED" in str(grpc_refused.value)
    finally:
        client.close()
    # Both refusals, REST and gRPC, count under the tenant and the limit that refused them.
    # The gRPC client has its status before the edge's observer has counted it: wait for it.
    def rejections() -> float | None:
        return gateway.gateway.metrics.registry.get_sample_value(
            "modelgate_tenant_quota_rejections_total",
            {"tenant": "metered", "limit": "requests_per_s"})

    wait_until(lambda: (rejections() or 0) >= 2, "both quota rejections counted")
    assert rejections() == 2


def test_metrics_and_access_log_name_the_protocol(
    guarded: tuple[RunningGateway, Path], rest_keys: Keys
) -> None:
    gateway, log = guarded
    port = gateway.gateway.rest_port
    assert rest(port, "POST", INFER, GOOD, bearer(rest_keys.user)).status == 200
    metrics = rest(gateway.gateway.metrics_port, "GET", "/metrics").body.decode()
    assert 'modelgate_protocol_requests_total{code="OK",protocol="http"}' in metrics
    wait_until(lambda: log.exists() and '"protocol":"http"' in log.read_text(),
               "an access log line of a REST request")
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    entry = next(e for e in lines if e["protocol"] == "http" and e["method"] == "ModelInfer"
                 and e["code"] == "200")
    assert entry["tenant"] == "user" and entry["model"] == "add" and entry["version"] == "1"


def test_tls_and_client_certificates(rest_store: Path, tmp_path: Path) -> None:
    ca = CertificateAuthority()
    server_cert, server_key = ca.issue("localhost", server=True).write(tmp_path, "server")
    client_cert, client_key = ca.issue("acme", org="Acme").write(tmp_path, "client")
    other_cert, other_key = ca.issue("intruder").write(tmp_path, "other")
    (tmp_path / "ca.crt").write_bytes(ca.pem)
    tenants = tmp_path / "tenants.toml"
    assert admin(tenants, "create", "acme", "--models", "*",
                 "--client-subject", "CN=acme,O=Acme")[0] == 0
    key = issue(tenants, "acme")
    with running_gateway(rest_store, http_port=0, tenants=tenants, tls_cert=server_cert,
                         tls_key=server_key, tls_client_ca=tmp_path / "ca.crt") as gateway:
        port = gateway.gateway.rest_port

        def call(cert: Path, cert_key: Path) -> int:
            context = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
            context.load_cert_chain(cert, cert_key)
            connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=30,
                                                     context=context)
            try:
                connection.request("POST", INFER, json.dumps(GOOD), {"x-api-key": key})
                return connection.getresponse().status
            finally:
                connection.close()

        assert call(client_cert, client_key) == 200
        # A certificate from the right CA but another subject: the key alone is not enough.
        assert call(other_cert, other_key) == 401
        plain = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=30,
                                                     context=plain)
            connection.request("GET", "/v2/health/live")
            connection.getresponse()
