"""What ModelStreamInfer messages leave behind, against the real gateway: a span per message
linked to the stream's span (trace context from the stream's metadata or the message's
traceparent parameter), an access-log line and a ModelStatistics inference per message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from modelgate_pb import grpc_service_pb2 as pb
from tests.support.gateway import running_gateway
from tests.support.models import add_constant, add_model_config, write_model
from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

STREAM_SPAN = "inference.GRPCInferenceService/ModelStreamInfer"
MESSAGE_SPAN = "inference.GRPCInferenceService/ModelStreamInfer message"
CALLER_TRACE, CALLER_SPAN = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
OWN_TRACE, OWN_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


def message(request_id: str, traceparent: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="plain", id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    if traceparent:
        request.parameters["traceparent"].string_param = traceparent
    return request


def test_each_message_is_traced_logged_and_counted(tmp_path: Path) -> None:
    write_model(tmp_path / "store", "plain", 1, add_constant(1.0), add_model_config("plain"))
    log_path = tmp_path / "access.log"
    with OtlpReceiver() as rx, running_gateway(
        tmp_path / "store", otlp_endpoint=rx.endpoint, access_log=str(log_path)
    ) as gw:
        stub = gw.stub()
        metadata = (("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"),)
        requests = [message("inherits"), message("own", f"00-{OWN_TRACE}-{OWN_SPAN}-01")]
        answers = list(stub.ModelStreamInfer(iter(requests), metadata=metadata, timeout=30))
        assert sorted(a.infer_response.id for a in answers) == ["inherits", "own"]
        statistics = stub.ModelStatistics(pb.ModelStatisticsRequest(name="plain"), timeout=10)
        assert statistics.model_stats[0].inference_count == 2
        wait_until(lambda: gw.gateway.streams.open_streams == 0, "the stream to close")
        assert gw.gateway.tracing is not None
        gw.gateway.tracing.force_flush()

        def named(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
            return [s for s in spans if s.name == name]

        spans = rx.wait_for(lambda s: len(named(s, MESSAGE_SPAN)) >= 2
                            and len(named(s, STREAM_SPAN)) >= 1)
        (stream,) = named(spans, STREAM_SPAN)
        assert (stream.trace_id, stream.parent_span_id) == (CALLER_TRACE, CALLER_SPAN)
        by_trace = {s.trace_id: s for s in named(spans, MESSAGE_SPAN)}
        inherits, own = by_trace[CALLER_TRACE], by_trace[OWN_TRACE]
        assert inherits.parent_span_id == CALLER_SPAN and own.parent_span_id == OWN_SPAN
        for span in (inherits, own):
            assert span.links == ((stream.trace_id, stream.span_id),)
            assert span.attributes["modelgate.model.name"] == "plain"
            assert span.attributes["rpc.grpc.status_code"] == 0
            # The pipeline's spans (the run in the instance) hang under the message's.
            assert any(s.parent_span_id == span.span_id for s in spans)
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    streamed = [entry for entry in lines if entry.get("method") == "ModelStreamInfer"]
    assert len(streamed) == 2
    assert {e["protocol"] for e in streamed} == {"grpc_stream"}
    assert {e["code"] for e in streamed} == {"OK"} and {e["model"] for e in streamed} == {"plain"}
