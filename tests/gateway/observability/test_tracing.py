"""Tracing over the real wire: a real gateway exports OTLP/gRPC to an in-process receiver;
parent/child structure, continued traceparents, batch links, attributes, sampling, and a
collector that is down."""

from __future__ import annotations

import concurrent.futures
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from gateway.observability.tracing import TRACE_ID_KEY, TracingConfigError, build_tracing
from gateway.settings import Settings
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc
from tests.support.gateway import GatewayProcess, RunningGateway, running_gateway
from tests.support.models import (
    plain_and_batched_store,
)
from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan

SERVER_KIND = 2  # opentelemetry.proto Span.SPAN_KIND_SERVER
CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
BATCH = 4


def infer_request(model: str, rows: int = 1) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[rows, 4])
    request.raw_input_contents.append(np.ones((rows, 4), np.float32).tobytes())
    return request


def trace_id_of(call: grpc.Call) -> str:
    return dict(call.trailing_metadata() or ())[TRACE_ID_KEY]


def of_trace(spans: list[ReceivedSpan], trace_id: str) -> dict[str, ReceivedSpan]:
    return {s.name: s for s in spans if s.trace_id == trace_id}


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as rx:
        yield rx


@pytest.fixture(scope="module")
def traced(receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[RunningGateway]:
    store = plain_and_batched_store(tmp_path_factory.mktemp("store"))
    with running_gateway(store, otlp_endpoint=receiver.endpoint) as gw:
        yield gw


def flush(gw: RunningGateway) -> None:
    tracing = gw.gateway.tracing
    assert tracing is not None
    tracing.force_flush()


def test_request_spans_form_one_tree_with_attributes(
    traced: RunningGateway, receiver: OtlpReceiver
) -> None:
    _, call = traced.stub().ModelInfer.with_call(infer_request("plain", rows=2))
    trace_id = trace_id_of(call)
    flush(traced)
    spans = receiver.wait_for(lambda s: len(of_trace(s, trace_id)) >= 5)
    tree = of_trace(spans, trace_id)
    assert tree["auth"].parent_span_id == tree[
        "inference.GRPCInferenceService/ModelInfer"].span_id
    server = tree["inference.GRPCInferenceService/ModelInfer"]
    infer, queue, batch = tree["infer plain"], tree["queue"], tree["batch plain"]
    assert server.parent_span_id == ""  # no traceparent sent: the gateway started the trace
    assert server.kind == SERVER_KIND
    assert infer.parent_span_id == server.span_id
    assert queue.parent_span_id == infer.span_id
    assert batch.parent_span_id == infer.span_id
    assert server.attributes["rpc.system"] == "grpc"
    assert server.attributes["rpc.service"] == "inference.GRPCInferenceService"
    assert server.attributes["rpc.method"] == "ModelInfer"
    assert server.attributes["rpc.grpc.status_code"] == 0
    assert server.attributes["network.peer.address"] == "127.0.0.1"
    assert server.attributes["modelgate.model.name"] == "plain"
    assert server.attributes["modelgate.model.version"] == 1
    assert server.attributes["modelgate.request.rows"] == 2
    assert server.attributes["modelgate.tenant.id"] == "anonymous"
    assert infer.attributes["modelgate.batch.size"] == 2
    assert "modelgate.queue.time_us" in infer.attributes
    assert batch.attributes["modelgate.batch.size"] == 2
    assert batch.attributes["modelgate.batch.requests"] == 1
    assert server.resource["service.name"] == "modelgate"
    for span in tree.values():  # never a key or tensor data
        assert not any("key" in name or "authorization" in name for name in span.attributes)


def test_incoming_traceparent_is_continued(
    traced: RunningGateway, receiver: OtlpReceiver
) -> None:
    metadata = (
        ("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"),
        ("tracestate", "vendor=abc"),
        ("baggage", "team=ml"),
    )
    _, call = traced.stub().ModelInfer.with_call(infer_request("plain"), metadata=metadata)
    assert trace_id_of(call) == CALLER_TRACE
    flush(traced)
    spans = receiver.wait_for(lambda s: len(of_trace(s, CALLER_TRACE)) >= 4)
    server = of_trace(spans, CALLER_TRACE)["inference.GRPCInferenceService/ModelInfer"]
    assert server.parent_span_id == CALLER_SPAN


def test_failed_request_span_has_its_status_code(
    traced: RunningGateway, receiver: OtlpReceiver
) -> None:
    with pytest.raises(grpc.RpcError) as failure:
        traced.stub().ModelInfer(infer_request("no_such_model"))
    assert failure.value.code() is grpc.StatusCode.NOT_FOUND
    trace_id = trace_id_of(failure.value)  # type: ignore[arg-type]
    # The client can have its error before the server span ends: wait for that span itself.
    server_span = "inference.GRPCInferenceService/ModelInfer"
    flush(traced)
    spans = receiver.wait_for(lambda s: server_span in of_trace(s, trace_id))
    server = of_trace(spans, trace_id)[server_span]
    assert server.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert "modelgate.model.name" not in server.attributes


def test_batch_span_links_to_every_member_request(
    traced: RunningGateway, receiver: OtlpReceiver
) -> None:
    stub = traced.stub()
    with concurrent.futures.ThreadPoolExecutor(BATCH) as pool:
        calls = list(pool.map(
            lambda _: stub.ModelInfer.with_call(infer_request("batched"))[1], range(BATCH)
        ))
    trace_ids = {trace_id_of(c) for c in calls}
    assert len(trace_ids) == BATCH
    flush(traced)

    def complete(spans: list[ReceivedSpan]) -> bool:
        return all("infer batched" in of_trace(spans, t) for t in trace_ids) and any(
            s.name == "batch batched" and s.trace_id in trace_ids for s in spans
        )

    spans = receiver.wait_for(complete)
    infers = {t: of_trace(spans, t)["infer batched"] for t in trace_ids}
    batches = [s for s in spans if s.name == "batch batched" and s.trace_id in trace_ids]
    assert len(batches) == 1  # the four requests rode in one batch
    batch = batches[0]
    assert batch.attributes["modelgate.batch.size"] == BATCH
    assert batch.attributes["modelgate.batch.requests"] == BATCH
    assert set(batch.links) == {(s.trace_id, s.span_id) for s in infers.values()}
    # The batch joins one member's trace; every member's span links back to it.
    assert batch.parent_span_id in {s.span_id for s in infers.values()}
    for infer in infers.values():
        assert (batch.trace_id, batch.span_id) in infer.links
        assert infer.attributes["modelgate.batch.size"] == BATCH


def test_sampling_ratio_zero_exports_nothing_but_honours_a_sampled_parent(
    tmp_path: Path,
) -> None:
    store = plain_and_batched_store(tmp_path)
    with OtlpReceiver() as rx, running_gateway(
        store, otlp_endpoint=rx.endpoint, trace_sampling_ratio=0.0
    ) as gw:
        stub = gw.stub()
        _, unsampled = stub.ModelInfer.with_call(infer_request("plain"))
        metadata = (("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"),)
        stub.ModelInfer.with_call(infer_request("plain"), metadata=metadata)
        flush(gw)
        spans = rx.wait_for(lambda s: len(of_trace(s, CALLER_TRACE)) >= 4)
        assert trace_id_of(unsampled)  # the id is returned even when not recorded
        assert {s.trace_id for s in spans} == {CALLER_TRACE}


def test_a_ratio_decides_before_any_span_and_sampled_traces_keep_the_id_returned(
    tmp_path: Path,
) -> None:
    # Without a caller's context the gateway draws the trace id and asks the ratio first:
    # sampled-out requests get an id but no span; sampled ones are exported under the
    # very id their answer carried. With 0.5, 40 requests are all of one kind with odds
    # of 2 in a trillion.
    store = plain_and_batched_store(tmp_path)
    with OtlpReceiver() as rx, running_gateway(
        store, otlp_endpoint=rx.endpoint, trace_sampling_ratio=0.5
    ) as gw:
        stub = gw.stub()
        ids = [trace_id_of(stub.ModelInfer.with_call(infer_request("plain"))[1])
               for _ in range(40)]
        assert all(len(i) == 32 and int(i, 16) for i in ids) and len(set(ids)) == 40
        kept = {i for i in ids if int(i[16:], 16) < 1 << 63}  # the ratio's own rule
        assert 0 < len(kept) < 40
        flush(gw)
        spans = rx.wait_for(lambda s: {x.trace_id for x in s} >= kept)
        assert {x.trace_id for x in spans} == kept
        for trace_id in kept:
            assert {"inference.GRPCInferenceService/ModelInfer", "infer plain"} <= set(
                of_trace(spans, trace_id))


def test_stopped_collector_costs_only_dropped_spans(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = plain_and_batched_store(tmp_path)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "1")  # read at start-up
    rx = OtlpReceiver().start()
    endpoint = rx.endpoint
    rx.stop()  # nothing listens there any more
    with running_gateway(store, otlp_endpoint=endpoint) as gw:
        stub = gw.stub()
        for _ in range(3):
            response = stub.ModelInfer(infer_request("plain"), timeout=10)
            assert response.model_name == "plain"
        flush(gw)  # the export fails (and is counted) on the exporter's thread, not ours
        url = f"http://127.0.0.1:{gw.gateway.metrics_port}/metrics"
        body = urllib.request.urlopen(url, timeout=10).read().decode()
    dropped = [
        line for line in body.splitlines()
        if line.startswith('modelgate_spans_dropped_total{reason="export_failed"}')
    ]
    assert dropped and float(dropped[0].split()[-1]) >= 3 * 4


def test_tracing_is_off_without_configuration(tmp_path: Path) -> None:
    with running_gateway(plain_and_batched_store(tmp_path)) as gw:
        assert gw.gateway.tracing is None
        _, call = gw.stub().ModelInfer.with_call(infer_request("plain"))
        assert TRACE_ID_KEY not in dict(call.trailing_metadata() or ())


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:1"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", "OTEL_SDK_DISABLED": "true"},
         False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", "OTEL_TRACES_EXPORTER": "none"},
         False),
    ],
)
def test_otel_environment_switches_tracing(environ: dict[str, str], on: bool) -> None:
    tracing = build_tracing(Settings(), lambda n, r: None, environ)
    assert (tracing is not None) is on
    if tracing is not None:
        tracing.shutdown()


def test_unsupported_otlp_protocol_is_refused() -> None:
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1",
               "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    with pytest.raises(TracingConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        build_tracing(Settings(), lambda n, r: None, environ)


def test_modelgate_serve_takes_flags_and_otel_environment(tmp_path: Path) -> None:
    store = plain_and_batched_store(tmp_path)
    env = {"OTEL_SERVICE_NAME": "gw-under-test", "OTEL_BSP_SCHEDULE_DELAY": "50"}
    with OtlpReceiver() as rx, GatewayProcess(
        ["--store", str(store), "--otlp-endpoint", f"127.0.0.1:{rx.port}",
         "--trace-sampling-ratio", "1", "--access-log", "-"], env=env,
    ) as gw, grpc.insecure_channel(gw.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        _, call = stub.ModelInfer.with_call(infer_request("plain"), timeout=30)
        trace_id = trace_id_of(call)
        spans = rx.wait_for(lambda s: len(of_trace(s, trace_id)) >= 4)
        log = gw.log()
    server = of_trace(spans, trace_id)["inference.GRPCInferenceService/ModelInfer"]
    assert server.resource["service.name"] == "gw-under-test"
    entries = [json.loads(line) for line in log.splitlines() if line.startswith('{"time"')]
    assert {e["method"] for e in entries} == {"ServerReady", "ModelInfer"}  # readiness polls
    assert [(e["model"], e["code"], e["trace_id"]) for e in entries
            if e["method"] == "ModelInfer"] == [("plain", "OK", trace_id)]
