"""curl-style raw requests against the REST port: each malformed, oversized or slow one gets
its status and a JSON error body naming what was wrong, and the server goes on answering
everyone else (checked after each, and during the slow client)."""

from __future__ import annotations

import gzip
import json
import socket
import struct
import threading
import time

import numpy as np
import pytest

from tests.gateway.http.conftest import Answer, rest
from tests.support.gateway import RunningGateway
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(180)

INFER = "/v2/models/add/versions/1/infer"
GOOD = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


def port_of(gateway: RunningGateway) -> int:
    return gateway.gateway.rest_port


def healthy(port: int) -> None:
    """A good inference still answers correctly."""
    answer = rest(port, "POST", INFER, GOOD)
    assert answer.status == 200, answer.body
    outputs = {o["name"]: o["data"] for o in answer.json()["outputs"]}
    assert outputs["y"] == [2, 3, 4, 5]


def error_of(answer: Answer, status: int) -> str:
    assert answer.status == status, (answer.status, answer.body)
    assert answer.headers["content-type"] == "application/json"
    message = answer.json()["error"]
    assert isinstance(message, str) and message
    return message


@pytest.mark.parametrize(("body", "expected"), [
    ('{"inputs": [', "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"inputs": []}', "'inputs' must be a non-empty list"),
    ({"inputs": [{"name": "x", "shape": [1, 5], "datatype": "FP32", "data": [0] * 5}]},
     "x"),
    ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3]}]},
     "needs 4 elements, 'data' holds 3"),
    ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                  "data": [1, "two", 3, 4]}]}, "element 1 is a string"),
    ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "INT32", "data": [1, 2, 3, 4]}]},
     "INT32"),
    ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP33", "data": [1, 2, 3, 4]}]},
     "unknown datatype 'FP33'"),
    ({"inputs": [{"name": "x", "shape": [1, -4], "datatype": "FP32", "data": [1]}]},
     "negative dimension"),
    ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                  "parameters": {"binary_data_size": 1 << 40}}]},
     "runs past the end of the body"),
    ({"inputs": [GOOD["inputs"][0]], "outputs": [{"name": "nope"}]}, "nope"),
    ({"inputs": [GOOD["inputs"][0]], "parameters": {"priority": -1}}, "priority"),
])
def test_bad_bodies_are_400_naming_the_problem(
    open_gateway: RunningGateway, body: str | dict[str, object], expected: str
) -> None:
    port = port_of(open_gateway)
    assert expected in error_of(rest(port, "POST", INFER, body), 400)
    healthy(port)


def test_binary_sizes_must_match_the_bytes_sent(open_gateway: RunningGateway) -> None:
    port = port_of(open_gateway)
    header = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 16}}]}).encode()
    raw = np.arange(4, dtype=np.float32).tobytes()
    good = rest(port, "POST", INFER, header + raw,
                {"Inference-Header-Content-Length": str(len(header))})
    assert good.status == 200
    assert [o["data"] for o in good.json()["outputs"] if o["name"] == "y"] == [[1, 2, 3, 4]]
    extra = rest(port, "POST", INFER, header + raw + b"\0\0\0\0",
                 {"Inference-Header-Content-Length": str(len(header))})
    assert "4 bytes of binary data follow" in error_of(extra, 400)
    past = rest(port, "POST", INFER, header + raw,
                {"Inference-Header-Content-Length": str(len(header) + 1000)})
    assert "Inference-Header-Content-Length" in error_of(past, 400)
    short = rest(port, "POST", INFER, header + raw[:12],
                 {"Inference-Header-Content-Length": str(len(header))})
    assert "runs past the end" in error_of(short, 400)
    healthy(port)


def test_bytes_elements_claiming_more_than_sent_are_refused(
    open_gateway: RunningGateway,
) -> None:
    port = port_of(open_gateway)
    elements = b"".join(struct.pack("<I", 1) + b"a" for _ in range(5)) + struct.pack(
        "<I", 1 << 30)
    others = [{"name": f"in_{t}", "shape": [2, 3], "datatype": t,
               "data": [False] * 6 if t == "BOOL" else [0] * 6}
              for t in ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16",
                        "INT32", "INT64", "FP16", "FP32", "FP64")]
    header = json.dumps({"inputs": [*others, {
        "name": "in_BYTES", "shape": [2, 3], "datatype": "BYTES",
        "parameters": {"binary_data_size": len(elements)}}],
        "outputs": [{"name": "out_BYTES"}]}).encode()
    answer = rest(port, "POST", "/v2/models/all_types/infer", header + elements,
                  {"Inference-Header-Content-Length": str(len(header))})
    assert "claims 1073741824 bytes" in error_of(answer, 400)
    healthy(port)


def test_oversized_bodies_are_413(open_gateway: RunningGateway) -> None:
    port = port_of(open_gateway)
    limit = open_gateway.gateway.settings.max_message_bytes
    big = b"{" + b" " * limit + b"}"
    assert "over the limit" in error_of(rest(port, "POST", INFER, big), 413)
    # A small gzip body that inflates past the limit stops once it passes it.
    bomb = gzip.compress(b" " * (limit * 8))
    assert len(bomb) < limit // 50
    answer = rest(port, "POST", INFER, bomb, {"Content-Encoding": "gzip"})
    assert "inflates to more than" in error_of(answer, 413)
    corrupt = rest(port, "POST", INFER, b"\x1f\x8b not gzip", {"Content-Encoding": "gzip"})
    assert "corrupt" in error_of(corrupt, 400)
    healthy(port)


def test_an_unknown_content_coding_is_415_naming_the_accepted_ones(
    open_gateway: RunningGateway,
) -> None:
    port = port_of(open_gateway)
    answer = rest(port, "POST", INFER, b"\x0b\x01\x80{}\x03", {"Content-Encoding": "br"})
    assert "gzip, deflate, identity" in error_of(answer, 415)
    assert answer.headers["accept-encoding"] == "gzip, deflate, identity"
    healthy(port)


def test_only_a_successful_inference_is_compressed(open_gateway: RunningGateway) -> None:
    """Triton compresses successful inferences alone; tritonclient.http.aio reads every
    other answer raw, so gzip there would break it."""
    port = port_of(open_gateway)
    asks = {"Accept-Encoding": "gzip, deflate"}
    inferred = rest(port, "POST", INFER, GOOD, asks)
    assert inferred.headers["content-encoding"] == "gzip"
    assert json.loads(gzip.decompress(inferred.body))["model_name"] == "add"
    for method, path, status in (("GET", "/v2", 200), ("GET", "/v2/models/add", 200),
                                 ("GET", "/v2/models/add/config", 200),
                                 ("GET", "/v2/models/add/stats", 200),
                                 ("POST", "/v2/repository/index", 200),
                                 ("GET", "/v2/models/nope", 404),
                                 ("POST", "/v2/models/nope/infer", 404)):
        answer = rest(port, method, path, GOOD if method == "POST" else None, asks)
        assert answer.status == status, (path, answer.status)
        assert "content-encoding" not in answer.headers, path
        assert answer.json()


def test_an_extension_not_served_is_501_naming_it(open_gateway: RunningGateway) -> None:
    port = port_of(open_gateway)
    for method, path in (("GET", "/v2/cudasharedmemory/status"),
                         ("POST", "/v2/cudasharedmemory/region/r0/register"),
                         ("POST", "/v2/cudasharedmemory/unregister")):
        assert "the cuda_shared_memory extension" in error_of(rest(port, method, path), 501)
    for path in ("/v2/models/add/generate", "/v2/models/add/versions/1/generate_stream"):
        assert "the generate extension" in error_of(rest(port, "POST", path, {}), 501)
    settings = rest(port, "PUT", "/v2/logging")
    assert error_of(settings, 405) and settings.headers["allow"] == "GET, POST"


def test_config_gives_64_bit_integers_as_numbers(open_gateway: RunningGateway) -> None:
    config = rest(port_of(open_gateway), "GET", "/v2/models/batched/config").json()
    assert config["input"][0]["dims"] == [4]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 20000


def test_unknown_paths_methods_and_huge_headers(open_gateway: RunningGateway) -> None:
    port = port_of(open_gateway)
    assert "/v2" in error_of(rest(port, "GET", "/v1/models/add"), 404)
    assert "unknown model" in error_of(rest(port, "GET", "/v2/models/nope"), 404)
    wrong = rest(port, "GET", INFER)
    assert error_of(wrong, 405) and wrong.headers["allow"] == "POST"
    huge = rest(port, "GET", "/v2", headers={"x-filler": "a" * 20_000})
    assert "headers are over the limit" in error_of(huge, 431)
    healthy(port)


def test_a_slow_loris_gets_408_while_others_are_served(open_gateway: RunningGateway) -> None:
    port = port_of(open_gateway)
    slow = socket.create_connection(("127.0.0.1", port), timeout=30)
    answered: list[bytes] = []

    def drip() -> None:
        # One header byte at a time, never finishing the request.
        try:
            slow.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\n")
            for byte in b"X-Slow: " + b"a" * 1000:
                slow.sendall(bytes([byte]))
                time.sleep(0.05)
        except OSError:
            return  # the server closed it

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    served = 0
    while dripper.is_alive() and served < 200:
        healthy(port)
        served += 1
        try:
            slow.settimeout(0.01)
            data = slow.recv(65536)
            if data:
                answered.append(data)
            else:
                break
        except TimeoutError:
            continue
    slow.settimeout(10)
    wait_until(lambda: answered or _drain(slow, answered), "the slow client's answer")
    text = b"".join(answered).decode()
    assert text.startswith("HTTP/1.1 408 "), text
    assert "did not arrive within" in text and "Connection: close" in text
    assert served >= 1
    slow.close()
    healthy(port)


def _drain(sock: socket.socket, into: list[bytes]) -> bool:
    data = sock.recv(65536)
    if data:
        into.append(data)
    return bool(data)


def test_keep_alive_and_pipelined_requests_are_answered_in_order(
    open_gateway: RunningGateway,
) -> None:
    port = port_of(open_gateway)
    body = json.dumps(GOOD).encode()
    one = (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
           ).encode() + body
    probe = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(one + probe + one)
        received: list[bytes] = []
        wait_until(lambda: _drain(sock, received) and b"".join(received).count(
            b"HTTP/1.1 200 OK") >= 3, "three answers")
    text = b"".join(received).decode()
    first, live, second = (text.index(marker, start) for marker, start in (
        ('"y"', 0), ('{"live":true}', 0), ('"y"', text.index('{"live":true}'))))
    assert first < live < second
    assert "Connection: close" not in text  # still open for more
