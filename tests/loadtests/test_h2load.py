"""The h2load driver: its body is one gRPC frame holding the request, a real gRPC server
answers it, and the figures are read correctly from what real h2load prints and logs.
h2load must be installed (scripts/install_test_deps.sh): these tests fail without it."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from loadtests import h2load
from loadtests.noop_server import METHOD, start_noop
from loadtests.requests import NotLoopbackError, request_for
from loadtests.servers import children, free_port, scrape, start_gateway
from modelgate_pb import grpc_service_pb2 as pb

pytestmark = pytest.mark.timeout(180)


def _digits_request(rows: int = 1) -> pb.ModelInferRequest:
    metadata = pb.ModelMetadataResponse(name="digits")
    metadata.inputs.add(name="pixels", datatype="FP32", shape=[-1, 64])
    return request_for(metadata, batch=rows)


def test_h2load_is_installed() -> None:
    assert h2load.binary() is not None, "h2load missing: run scripts/install_test_deps.sh"


def test_the_body_is_one_grpc_frame_holding_the_request() -> None:
    request = _digits_request(rows=3)
    body = h2load.body_for(request)
    assert body[0] == 0  # not compressed
    assert int.from_bytes(body[1:5], "big") == len(body) - 5
    assert pb.ModelInferRequest.FromString(h2load.parse_frame(body)) == request
    with pytest.raises(ValueError):
        h2load.parse_frame(body[:-1])
    with pytest.raises(ValueError):
        h2load.parse_frame(b"\x01" + body[1:])


def test_a_real_h2load_run_against_the_noop_server_is_read_back() -> None:
    answer = pb.ModelInferResponse(model_name="digits", id="fixed").SerializeToString()
    with start_noop(free_port(), answer) as noop:
        run = h2load.run_h2load(noop.target, h2load.body_for(_digits_request()),
                                connections=2, streams=4, duration_s=0.5, warmup_s=0.1)
    assert run.succeeded > 0 and run.failed == run.errored == run.timed_out == 0
    # Every request h2load finished is one logged row; the good ones carry a latency.
    assert run.done == len(run.latencies_s) + sum(run.http_errors.values())
    assert len(run.latencies_s) == run.succeeded
    assert all(0 < s < 30 for s in run.latencies_s)
    # h2load's own req/s is its finished requests over the measured duration.
    assert run.reported_req_per_s == pytest.approx(run.done / 0.5, rel=0.02)
    level = h2load.as_level(run, "no-op server", rows=1, workers=1, connections=2, streams=4)
    assert (level.driver, level.load, level.requests, level.errors) == ("h2load", 8, run.done, {})
    p999 = level.summary()["p99.9_ms"]
    assert isinstance(p999, float) and p999 > 0


def test_the_gateway_answers_h2load_requests_ok() -> None:
    with start_gateway(None) as gateway:
        before = scrape(gateway.metrics_port)
        run = h2load.run_h2load(gateway.target, h2load.body_for(_digits_request()),
                                connections=1, streams=4, duration_s=0.5, warmup_s=0.0)
        after = scrape(gateway.metrics_port)
    assert before is not None and after is not None and run.succeeded > 0
    delta = after.since(before)
    # h2load cannot see gRPC status codes, but the gateway counted each answer OK (plus at
    # most the streams h2load reset when its time was up, counted CANCELLED).
    assert delta.answers[("digits", "OK")] >= run.succeeded
    assert set(delta.errors("digits")) <= {"CANCELLED"}
    assert delta.errors("digits").get("CANCELLED", 0) <= 4


def test_h2load_refuses_other_hosts_and_parses_no_summary() -> None:
    with pytest.raises(NotLoopbackError):
        h2load.run_h2load("10.0.0.1:8001", b"", connections=1, streams=1, duration_s=0.1,
                          warmup_s=0)
    with pytest.raises(ValueError):
        h2load.parse_output("starting benchmark...\n", 1.0)


def test_the_noop_server_runs_several_workers_on_one_port() -> None:
    answer = b"fixed answer"
    with start_noop(free_port(), answer, workers=2) as noop:
        workers = [c for c in children(noop.pid)
                   if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(workers) == 2
        # Fresh connections land on either worker; every one answers the same bytes.
        for _ in range(6):
            options = [("grpc.use_local_subchannel_pool", 1)]
            with grpc.insecure_channel(noop.target, options=options) as channel:
                assert channel.unary_unary(METHOD, None, None)(b"", timeout=10) == answer


def test_a_stream_body_is_several_frames_each_a_request_with_its_id() -> None:
    request = _digits_request()
    body = h2load.stream_body_for(request, 3)
    frames = []
    while body:
        length = int.from_bytes(body[1:5], "big")
        frames.append(h2load.parse_frame(body[:5 + length]))
        body = body[5 + length:]
    ids = [pb.ModelInferRequest.FromString(f).id for f in frames]
    assert ids == ["0", "1", "2"]
    with pytest.raises(ValueError):
        h2load.stream_body_for(request, 0)


def test_h2load_streams_answer_every_message_of_the_body() -> None:
    """h2load posting a body of 8 frames to ModelStreamInfer: the no-op server answers each
    (its stream run counts as succeeded), and the gateway counts each message OK."""
    request = _digits_request()
    body = h2load.stream_body_for(request, 8)
    answer = pb.ModelInferResponse(model_name="digits").SerializeToString()
    with start_noop(free_port(), answer) as noop:
        run = h2load.run_h2load(noop.target, body, connections=1, streams=2, duration_s=0.3,
                                warmup_s=0, path=h2load.STREAM_PATH)
    assert run.succeeded > 0 and not run.http_errors
    with start_gateway(None) as gateway:
        before = scrape(gateway.metrics_port)
        run = h2load.run_h2load(gateway.target, body, connections=1, streams=2,
                                duration_s=0.5, warmup_s=0, path=h2load.STREAM_PATH)
        after = scrape(gateway.metrics_port)
    assert before is not None and after is not None and run.succeeded > 0
    delta = after.since(before)
    assert delta.answers[("digits", "OK")] >= 8 * run.succeeded
    assert set(delta.errors("digits")) <= {"CANCELLED"}
