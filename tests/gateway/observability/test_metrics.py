"""Prometheus metrics and probes over real HTTP: known traffic against a real gateway, then
exact counts from a /metrics scrape; /healthz and /readyz."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.observability.metrics import MAX_TENANTS, OTHER_TENANT, Metrics
from modelgate_pb import grpc_service_pb2 as pb
from tests.gateway.tenancy.test_tenants import admin, issue
from tests.support.gateway import RunningGateway, running_gateway
from tests.support.models import (
    add_constant,
    add_model_config,
    plain_and_batched_store,
    write_model,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def infer_request(model: str, rows: int = 1, width: int = 4) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[rows, width])
    request.raw_input_contents.append(np.ones((rows, width), np.float32).tobytes())
    return request


def get(gw: RunningGateway, path: str, method: str = "GET") -> tuple[int, str]:
    url = f"http://127.0.0.1:{gw.gateway.metrics_port}{path}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(gw: RunningGateway) -> Samples:
    status, body = get(gw, "/metrics")
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    with running_gateway(plain_and_batched_store(tmp_path_factory.mktemp("store"))) as gw:
        yield gw


@pytest.fixture(scope="module")
def traffic(gateway: RunningGateway) -> Samples:
    """3 good 'plain' requests of 2 rows, one of a wrong shape, one for an unknown model,
    and 4 concurrent 1-row 'batched' requests (one batch of 4)."""
    stub = gateway.stub()
    for _ in range(3):
        stub.ModelInfer(infer_request("plain", rows=2))
    for bad in (infer_request("plain", width=3), infer_request("no_such_model")):
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(bad)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: stub.ModelInfer(infer_request("batched")), range(4)))
    return scrape(gateway)


def test_requests_are_counted_by_model_version_and_code(traffic: Samples) -> None:
    total = "modelgate_inference_requests_total"
    assert value(traffic, total, model="plain", version="1", code="OK") == 3
    assert value(traffic, total, model="plain", version="1", code="INVALID_ARGUMENT") == 1
    # An unknown name never becomes a label value.
    assert value(traffic, total, model="", version="", code="NOT_FOUND") == 1
    assert value(traffic, total, model="batched", version="1", code="OK") == 4
    assert not any("no_such_model" in str(key) for key in traffic)
    tenant = "modelgate_tenant_requests_total"
    assert value(traffic, tenant, tenant="anonymous", code="OK") == 7


def test_rows_and_executions_follow_triton(traffic: Samples) -> None:
    # inference_count counts rows, exec_count executions; warm-up is not counted.
    assert value(traffic, "modelgate_inference_count_total", model="plain", version="1") == 6
    assert value(traffic, "modelgate_inference_exec_count_total",
                 model="plain", version="1") == 3
    assert value(traffic, "modelgate_inference_count_total", model="batched", version="1") == 4
    assert value(traffic, "modelgate_inference_exec_count_total",
                 model="batched", version="1") == 1
    batch = "modelgate_inference_batch_size"
    assert value(traffic, f"{batch}_count", model="batched", version="1") == 1
    assert value(traffic, f"{batch}_sum", model="batched", version="1") == 4
    assert value(traffic, f"{batch}_bucket", model="batched", version="1", le="2.0") == 0
    assert value(traffic, f"{batch}_bucket", model="batched", version="1", le="4.0") == 1


def test_duration_histograms_and_gauges(traffic: Samples) -> None:
    labels = {"model": "plain", "version": "1"}
    # Request duration counts every answered request of the version (the malformed one
    # too); queue and compute durations only those that ran.
    for name, count in (("request", 4), ("queue", 3), ("compute", 3)):
        family = f"modelgate_inference_{name}_duration_seconds"
        assert value(traffic, f"{family}_count", **labels) == count
        assert value(traffic, f"{family}_bucket", **labels, le="+Inf") == count
        assert value(traffic, f"{family}_bucket", **labels, le="5e-05") <= count
    batched = {"model": "batched", "version": "1"}
    assert value(traffic, "modelgate_inference_queue_duration_seconds_count", **batched) == 4
    assert value(traffic, "modelgate_inference_compute_duration_seconds_count", **batched) == 4
    for gauge in ("modelgate_inference_queue_depth", "modelgate_inference_in_flight"):
        assert (gauge, frozenset(labels.items())) in traffic
        assert value(traffic, gauge, **labels) == 0
        assert value(traffic, gauge, **batched) == 0


def test_process_and_health_families_are_exported(traffic: Samples) -> None:
    names = {name for name, _ in traffic}
    assert "process_cpu_seconds_total" in names
    assert "process_resident_memory_bytes" in names
    assert "modelgate_redis_outages_total" in names


def test_probes(gateway: RunningGateway) -> None:
    assert get(gateway, "/healthz") == (200, "ok\n")
    status, body = get(gateway, "/readyz")
    assert status == 200
    assert json.loads(body) == {"ready": True, "not_ready": {}}
    assert get(gateway, "/nope")[0] == 404
    assert get(gateway, "/metrics", method="POST")[0] == 405
    assert get(gateway, "/healthz", method="HEAD")[0] == 200


def test_garbage_request_line_gets_400(gateway: RunningGateway) -> None:
    with socket.create_connection(("127.0.0.1", gateway.gateway.metrics_port), 5) as sock:
        sock.sendall(b"hello\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")


def test_readyz_names_a_version_that_failed_to_load(tmp_path: Path) -> None:
    write_model(tmp_path, "plain", 1, add_constant(1.0), add_model_config("plain"))
    write_model(tmp_path, "broken", 1, b"not an onnx model", add_model_config("broken"))
    with running_gateway(tmp_path) as gw:
        status, body = get(gw, "/readyz")
        assert get(gw, "/healthz")[0] == 200
        index = gw.stub().RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
    assert status == 503
    report = json.loads(body)
    assert report["ready"] is False
    assert list(report["not_ready"]) == ["broken/1"]
    # The probe shows the reason gRPC clients see: file names, never the store's path.
    grpc_reason = next(m.reason for m in index.models if m.name == "broken")
    assert "model.onnx" in grpc_reason and str(tmp_path) not in body
    assert report["not_ready"]["broken/1"] == f"UNAVAILABLE: {grpc_reason}"


def test_tenant_label_is_bounded() -> None:
    metrics = Metrics(process_metrics=False)
    labels = {metrics.tenant_label(f"t{i}") for i in range(MAX_TENANTS + 10)}
    assert len(labels) == MAX_TENANTS + 1
    assert OTHER_TENANT in labels
    assert metrics.tenant_label("t0") == "t0"


def test_quota_rejections_redis_outages_and_span_drops_count() -> None:
    metrics = Metrics(process_metrics=False)
    metrics.count_quota_rejection("acme", "requests_per_s")
    metrics.count_quota_rejection("acme", "requests_per_s;model=iris")
    metrics.count_quota_rejection("acme", "concurrent")
    metrics.count_quota_rejection("acme", "no_such_limit")
    metrics.count_quota_rejection("acme", None)
    metrics.count_redis_outage()
    metrics.count_dropped_spans(5, "queue_full")
    body = metrics.exposition().decode()
    # A per-model limit counts under its limit's name; what is no known limit, as _other.
    rejections = "modelgate_tenant_quota_rejections_total"
    assert f'{rejections}{{limit="requests_per_s",tenant="acme"}} 2.0' in body
    assert f'{rejections}{{limit="concurrent",tenant="acme"}} 1.0' in body
    assert f'{rejections}{{limit="_other",tenant="acme"}} 2.0' in body
    assert "no_such_limit" not in body
    assert "modelgate_redis_outages_total 1.0" in body
    assert 'modelgate_spans_dropped_total{reason="queue_full"} 5.0' in body


def test_tenants_and_quota_rejections_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    keys = {}
    for tenant_id, flags in (("rate", ["--requests-per-s", "0.01", "--burst", "3"]),
                             ("daily", ["--requests-per-day", "1", "--rows-per-s", "0.01",
                                        "--rows-burst", "4"]),
                             ("free", [])):
        assert admin(path, "create", tenant_id, *flags)[0] == 0
        keys[tenant_id] = issue(path, tenant_id)

    def send(key: str, rows: int = 1) -> grpc.StatusCode:
        try:
            stub.ModelInfer(infer_request("plain", rows),
                            metadata=(("authorization", f"Bearer {key}"),), timeout=30)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK

    write_model(tmp_path / "store", "plain", 1, add_constant(1.0), add_model_config("plain"))
    with running_gateway(tmp_path / "store", tenants=path) as gw:
        stub = gw.stub()
        codes = [send(keys["rate"]) for _ in range(4)] + [send(keys["free"]) for _ in range(2)]
        codes.append(send("mg_rate_" + "x" * 40))
        # More rows than the row bucket holds, then past the day's single request.
        daily = [send(keys["daily"], rows=5), send(keys["daily"]), send(keys["daily"])]
        samples = scrape(gw)
    ok, exhausted = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED
    assert codes == [ok, ok, ok, exhausted, ok, ok, grpc.StatusCode.UNAUTHENTICATED]
    assert daily == [exhausted, ok, exhausted]
    tenant = "modelgate_tenant_requests_total"
    assert value(samples, tenant, tenant="rate", code="OK") == 3
    assert value(samples, tenant, tenant="rate", code="RESOURCE_EXHAUSTED") == 1
    assert value(samples, tenant, tenant="free", code="OK") == 2
    assert value(samples, tenant, tenant="_anonymous", code="UNAUTHENTICATED") == 1
    # Each rejection counts under its tenant and the limit that refused it.
    rejections = "modelgate_tenant_quota_rejections_total"
    assert {labels: v for (name, labels), v in samples.items() if name == rejections} == {
        frozenset({("tenant", "rate"), ("limit", "requests_per_s")}): 1,
        frozenset({("tenant", "daily"), ("limit", "rows_burst")}): 1,
        frozenset({("tenant", "daily"), ("limit", "requests_per_day")}): 1,
    }
    total = "modelgate_inference_requests_total"
    assert value(samples, total, model="plain", version="1", code="RESOURCE_EXHAUSTED") == 3
