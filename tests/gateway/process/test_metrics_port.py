"""The metrics port is served by the REST port's HTTP stack: what the REST port refuses (an
oversized head, a head that never completes) the metrics port refuses with the same answer,
it keeps connections alive, answers HEAD with the head alone, and takes no request body."""

from __future__ import annotations

import http.client
from collections.abc import Iterator

import pytest

from tests.hardening.raw_http import exchange
from tests.support.gateway import RunningGateway, running_gateway
from tests.support.models import add_constant, add_model_config, write_model

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    store = tmp_path_factory.mktemp("metrics-port-store")
    write_model(store, "plain", 1, add_constant(1.0), add_model_config("plain"))
    with running_gateway(store, http_port=0, http_read_timeout_s=1.0) as gw:
        yield gw


def _ports(gw: RunningGateway) -> dict[str, int]:
    return {"rest": gw.gateway.rest_port, "metrics": gw.gateway.metrics_port}


def _status_and_body(raw: bytes) -> tuple[int, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize(("payload", "status", "message"), [
    # A head over 16 KiB.
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 20_000 + b"\r\n\r\n", 431,
     b"headers are over the limit of 16384 bytes"),
    # A head never finished (slow-loris): http_read_timeout_s (1 s here) ends it.
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\n", 408, b"did not arrive within 1 seconds"),
], ids=["oversized-head", "unfinished-head"])
def test_both_ports_refuse_alike(gateway: RunningGateway, payload: bytes, status: int,
                                 message: bytes) -> None:
    answers = [exchange(port, payload) for port in _ports(gateway).values()]
    assert [a.statuses for a in answers] == [[status], [status]]
    rest, metrics = (_status_and_body(a.raw) for a in answers)
    assert rest == metrics
    assert message in metrics[1]


def test_the_metrics_port_keeps_alive_and_answers_head_without_a_body(
        gateway: RunningGateway) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", gateway.gateway.metrics_port,
                                            timeout=10)
    try:
        connection.request("HEAD", "/healthz")
        head = connection.getresponse()
        assert (head.status, head.getheader("Content-Length"), head.read()) == (200, "3", b"")
        assert head.getheader("Cache-Control") == "no-store"
        kept = connection.sock
        assert kept is not None  # not closed after the answer: kept alive
        # The same connection: a body sent after the HEAD answer would be misread here.
        connection.request("GET", "/healthz")
        get = connection.getresponse()
        assert (get.status, get.read()) == (200, b"ok\n")
        assert connection.sock is kept
        connection.request("GET", "/readyz")
        ready = connection.getresponse()
        assert (ready.status, ready.getheader("Content-Type")) == (200, "application/json")
        assert ready.read() == b'{"not_ready": {}, "ready": true}\n'
    finally:
        connection.close()


def test_the_metrics_port_takes_no_body(gateway: RunningGateway) -> None:
    payload = (b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"
               + b"0123456789")
    answer = exchange(gateway.gateway.metrics_port, payload)
    assert answer.statuses == [413]
    assert b"over the limit of 0 bytes" in answer.raw
