"""Hostile clients on the REST port of the real ``modelgate serve`` process: bodies of tiny
chunks (with and without a key), the server-wide body budget, pipelined requests ahead of a
framing error, smuggling attempts, slow clients, the connection limit and JSON data of the
wrong kind. Each attack runs
while the server's resident memory is sampled from /proc and must leave it within a stated
bound; the server answers a good request after each."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gateway.settings import Settings
from tests.hardening.raw_http import (
    GOOD_BODY,
    INFER,
    Exchange,
    chunked_head,
    exchange,
    post,
    tiny_chunks,
)
from tests.support.gateway import GatewayProcess, free_port, running_gateway
from tests.support.memory import RssGrowth
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(300)

LIMIT = 2 << 20  # max_message_bytes of the process under attack
ATTACKERS = 4  # connections attacking at once
# A request's body costs at most about three times its size while it is read and handed
# over (one growing buffer, over-allocated by an eighth, and the bytes made from it); the
# rest is slack for the interpreter's own allocations.
PER_REQUEST_BOUND = 3 * LIMIT
SLACK = 16 << 20


@pytest.fixture(scope="module")
def gateway(hardening_store: Path, tenant_keys: tuple[Path, str, str]
            ) -> Iterator[tuple[GatewayProcess, int]]:
    http_port = free_port()
    with GatewayProcess(["--store", str(hardening_store), "--tenants", str(tenant_keys[0]),
                         "--http-port", str(http_port), "--max-message-bytes", str(LIMIT),
                         "--http-read-timeout-s", "60"]) as proc:
        yield proc, http_port


def auth(tenant_keys: tuple[Path, str, str]) -> dict[str, str]:
    return {"x-api-key": tenant_keys[1]}


def answers_a_good_request(port: int, tenant_keys: tuple[Path, str, str]) -> None:
    done = exchange(port, post(INFER, GOOD_BODY, auth(tenant_keys), close=True))
    assert done.statuses == [200], done.raw[:500]


def attack(port: int, payload: bytes, connections: int = ATTACKERS) -> list[Exchange]:
    with ThreadPoolExecutor(connections) as pool:
        return list(pool.map(lambda _: exchange(port, payload), range(connections)))


def test_tiny_chunks_without_a_key_are_refused_before_the_body_is_held(
    gateway: tuple[GatewayProcess, int], tenant_keys: tuple[Path, str, str]
) -> None:
    proc, port = gateway
    payload = chunked_head(INFER) + tiny_chunks(LIMIT)  # 7 MiB on the wire, 2 MiB of body
    with RssGrowth(proc.proc.pid) as growth:
        done = attack(port, payload)
    for one in done:
        assert one.statuses == [401], one.raw[:300]
        assert one.header("WWW-Authenticate") is not None
    # Nothing of the bodies is held: growth is the interpreter's noise, not the bodies.
    assert growth.peak_kib < SLACK >> 10, growth.peak_kib
    answers_a_good_request(port, tenant_keys)


def test_tiny_chunks_with_a_key_cost_a_bounded_buffer(
    gateway: tuple[GatewayProcess, int], tenant_keys: tuple[Path, str, str]
) -> None:
    proc, port = gateway
    payload = chunked_head(INFER, auth(tenant_keys)) + tiny_chunks(LIMIT)
    with RssGrowth(proc.proc.pid) as growth:
        done = attack(port, payload)
    for one in done:
        assert one.statuses == [400], one.raw[:300]
        assert b"send larger chunks" in one.raw, one.raw[:300]
    # Held as list items, a million two-byte chunks cost over 40 MiB per connection.
    bound = ATTACKERS * PER_REQUEST_BOUND + SLACK
    assert growth.peak_kib < bound >> 10, (growth.peak_kib, bound >> 10)
    answers_a_good_request(port, tenant_keys)


def test_a_chunked_body_over_the_limit_is_refused_as_it_passes(
    gateway: tuple[GatewayProcess, int], tenant_keys: tuple[Path, str, str]
) -> None:
    proc, port = gateway
    chunk = b"1000\r\n" + b"x" * 4096 + b"\r\n"  # 4 KiB chunks: the chunk rule allows them
    payload = chunked_head(INFER, auth(tenant_keys)) + chunk * (4 * LIMIT // 4096) + b"0\r\n\r\n"
    with RssGrowth(proc.proc.pid) as growth:
        done = attack(port, payload)
    for one in done:
        assert one.statuses == [413], one.raw[:300]
    assert growth.peak_kib < (ATTACKERS * PER_REQUEST_BOUND + SLACK) >> 10, growth.peak_kib
    answers_a_good_request(port, tenant_keys)


def test_tiny_chunks_are_taken_only_as_far_as_the_first_thousand(
    gateway: tuple[GatewayProcess, int], tenant_keys: tuple[Path, str, str]
) -> None:
    _, port = gateway
    head = chunked_head(INFER, auth(tenant_keys))
    # Leading spaces are JSON whitespace: 1000 one-byte chunks, then the request.
    fine = head + b"1\r\n \r\n" * 1000 + f"{len(GOOD_BODY):x}\r\n".encode() + GOOD_BODY
    assert exchange(port, fine + b"\r\n0\r\n\r\n").statuses == [200]
    many = head + b"1\r\n \r\n" * 2000 + f"{len(GOOD_BODY):x}\r\n".encode() + GOOD_BODY
    refused = exchange(port, many + b"\r\n0\r\n\r\n")
    assert refused.statuses == [400], refused.raw
    assert b"send larger chunks" in refused.raw


def test_every_pipelined_request_before_a_framing_error_is_answered_in_order(
    gateway: tuple[GatewayProcess, int], tenant_keys: tuple[Path, str, str]
) -> None:
    proc, port = gateway
    good = post(INFER, GOOD_BODY, auth(tenant_keys))
    with RssGrowth(proc.proc.pid) as growth:
        # A complete request, then junk, in one write.
        junk = exchange(port, good + b"JUNK\x00\x01 junk\r\n\r\n")
        # Three complete requests, then junk.
        three = exchange(port, good * 3 + b"\x00\x00\x00\r\n\r\n")
        # Content-Length smaller than the body sent: the rest is read as the next request.
        short = post(INFER, GOOD_BODY, auth(tenant_keys)).replace(
            f"Content-Length: {len(GOOD_BODY)}".encode(),
            f"Content-Length: {len(GOOD_BODY) - 7}".encode())
        shorter = exchange(port, short)
    assert junk.statuses == [200, 400], junk.raw
    assert three.statuses == [200, 200, 200, 400], three.raw
    # The 7 bytes left over ('4]}]}' and so on) are no request line.
    assert shorter.statuses == [400, 400], shorter.raw
    assert growth.peak_kib < SLACK >> 10
    answers_a_good_request(port, tenant_keys)


def test_answers_before_a_framing_error_survive_a_client_that_keeps_sending(
    gateway: tuple[GatewayProcess, int], tenant_keys: tuple[Path, str, str]
) -> None:
    proc, port = gateway
    good = post(INFER, GOOD_BODY, auth(tenant_keys))
    # After the junk the client goes on writing: what it sends while the request ahead is
    # served is read and dropped, so the close that follows does not reset the answers.
    with RssGrowth(proc.proc.pid) as growth:
        done = exchange(port, good + b"JUNK\x00\x01 junk\r\n\r\n" + b"z" * (4 << 20))
    assert done.statuses == [200, 400], done.raw
    assert growth.peak_kib < SLACK >> 10


@pytest.mark.parametrize("framing", [
    # Content-Length and Transfer-Encoding together, the chunked body hiding a request.
    "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
    # Two different lengths.
    "Content-Length: 4\r\nContent-Length: 60\r\n",
    # A transfer coding that does not end in chunked.
    "Transfer-Encoding: chunked, identity\r\n",
])
def test_smuggling_attempts_are_refused_and_nothing_hidden_is_served(
    gateway: tuple[GatewayProcess, int], tenant_keys: tuple[Path, str, str], framing: str
) -> None:
    proc, port = gateway
    hidden = post("/v2/models/add/versions/1/ready", b"")
    body = b"0\r\n\r\n" + hidden
    head = (f"POST {INFER} HTTP/1.1\r\nHost: gateway\r\nx-api-key: {tenant_keys[1]}\r\n"
            f"{framing}\r\n").encode()
    with RssGrowth(proc.proc.pid) as growth:
        done = exchange(port, head + body)
    # One answer, a refusal, and the connection closes: the hidden request never runs.
    assert done.statuses == [400], done.raw
    assert growth.peak_kib < SLACK >> 10
    answers_a_good_request(port, tenant_keys)


def test_slow_clients_are_cut_at_the_read_timeout_holding_little(
    hardening_store: Path, tenant_keys: tuple[Path, str, str]
) -> None:
    http_port = free_port()
    with GatewayProcess(["--store", str(hardening_store), "--tenants", str(tenant_keys[0]),
                         "--http-port", str(http_port), "--http-read-timeout-s", "1"]) as proc:
        head = post(INFER, GOOD_BODY, auth(tenant_keys))[:-len(GOOD_BODY)]
        stop = threading.Event()

        def trickle(sock: socket.socket) -> None:
            # One byte of the body at a time, slower than any timeout would wait for.
            for byte in GOOD_BODY:
                if stop.wait(0.2):
                    return
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    return

        sockets = [socket.create_connection(("127.0.0.1", http_port), timeout=30)
                   for _ in range(50)]
        try:
            with RssGrowth(proc.proc.pid) as growth:
                threads = []
                for sock in sockets:
                    sock.sendall(head)
                    thread = threading.Thread(target=trickle, args=(sock,), daemon=True)
                    thread.start()
                    threads.append(thread)
                answers_a_good_request(http_port, tenant_keys)  # served meanwhile
                answers = []
                for sock in sockets:
                    chunks = []
                    while data := _recv(sock):
                        chunks.append(data)
                    answers.append(Exchange(b"".join(chunks)))
                stop.set()
                for thread in threads:
                    thread.join(10)
        finally:
            stop.set()
            for sock in sockets:
                sock.close()
        for answer in answers:
            assert answer.statuses == [408], answer.raw
        assert growth.peak_kib < SLACK >> 10, growth.peak_kib


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except (ConnectionResetError, TimeoutError):
        return b""


def test_max_connections_has_a_safe_default_and_bounds_the_rest_port(
    hardening_store: Path
) -> None:
    assert 0 < Settings().max_connections <= 10_000
    with running_gateway(hardening_store, http_port=0, max_connections=2) as gw:
        port = gw.gateway.rest_port
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        try:
            assert gw.gateway.rest is not None
            rest = gw.gateway.rest.listener
            wait_until(lambda: rest.open_connections == 2, "two connections held")
            refused = exchange(port, post("/v2/health/live", b"", close=True), timeout=10)
            assert refused.statuses == []  # closed as it was accepted
            held[0].close()
            wait_until(lambda: rest.open_connections == 1, "one connection closed")
            live = exchange(port, post("/v2/health/ready", b"", close=True), timeout=10)
            assert live.statuses  # answered once below the limit
        finally:
            for sock in held:
                sock.close()


def test_the_body_budget_refuses_new_bodies_with_503_instead_of_growing(
    hardening_store: Path
) -> None:
    limit = 1 << 20
    with running_gateway(hardening_store, http_port=0, max_message_bytes=limit,
                         http_body_budget_bytes=limit) as gw:
        port = gw.gateway.rest_port
        assert gw.gateway.rest is not None
        rest = gw.gateway.rest.listener
        body = b" " * (limit - 1000)
        # A body that stops short: the budget holds what arrived.
        slow = socket.create_connection(("127.0.0.1", port), timeout=30)
        try:
            whole = post(INFER, body, close=True)
            slow.sendall(whole[:-300_000])
            arrived = len(body) - 300_000
            wait_until(lambda: rest.body_bytes_held >= arrived, "the slow body held")
            # A declared length that does not fit: 503 before a byte of it is read.
            declared = exchange(port, post(INFER, b"x" * 400_000, close=True))
            assert declared.statuses == [503], declared.raw
            assert declared.header("Retry-After") == "1"
            # A chunked body is refused as it passes the budget.
            chunked = exchange(port, chunked_head(INFER) + b"60000\r\n" + b"y" * 0x60000
                               + b"\r\n0\r\n\r\n")
            assert chunked.statuses == [503], chunked.raw
            assert rest.body_bytes_held <= limit
            slow.sendall(whole[-300_000:])
            answer = b""
            while data := _recv(slow):
                answer += data
            assert Exchange(answer).statuses == [400]  # spaces are no JSON body
        finally:
            slow.close()
        wait_until(lambda: rest.body_bytes_held == 0, "the budget given back")
        assert exchange(port, post(INFER, GOOD_BODY, close=True)).statuses == [200]


@pytest.mark.parametrize(("data", "named"), [
    ([True, 0.5, 0.5, 0.5], "element 0 is a boolean"),
    ([[0.5, 0.5, False, 0.5]], "element 2 is a boolean"),
    ([0.5, 0.5, 0.5, "1"], "element 3 is a string"),
    ([1, [2, 3], 4], "data holds 3 items where dimension 0"),
    ([[1, 2], [3, 4]], "data holds 2 items where dimension 0"),
    ([[1, 2, 3, [4]]], "data[0][3] is a list where a value was expected"),
    ([[[1, 2, 3, 4]]], "data[0] holds 1 items where dimension 1"),
])
def test_json_data_of_the_wrong_kind_is_refused_in_any_position(
    gateway: tuple[GatewayProcess, int], tenant_keys: tuple[Path, str, str],
    data: list[object], named: str
) -> None:
    # FP32 data, as the model takes it; the other datatypes' checks: tests/gateway/http.
    _, port = gateway
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                   "data": data}]}).encode()
    done = exchange(port, post(INFER, body, auth(tenant_keys), close=True))
    assert done.statuses == [400], done.raw
    message = json.loads(done.raw.partition(b"\r\n\r\n")[2])["error"]
    assert "input 'x'" in message and named in message, message
