"""The REST port's fast paths answer exactly as the full ones: a binary header seen before
(decoded from its remembered plan) against each version and model it is sent to, a body
whose tensor bytes no longer match the remembered header, JSON data the standard library
must parse (NaN, Infinity, integers past 64 bits), and answers orjson writes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.gateway.http.conftest import rest
from tests.support.gateway import RunningGateway

pytestmark = pytest.mark.timeout(120)


def binary(path: str, port: int, x: np.ndarray, name: str = "x",
           datatype: str = "FP32") -> tuple[int, dict[str, object], bytes]:
    """A binary-tensor request with binary outputs; the answer's JSON and raw bytes."""
    header = json.dumps({"inputs": [{"name": name, "shape": list(x.shape),
                                     "datatype": datatype,
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    answer = rest(port, "POST", path, header + x.tobytes(),
                  {"Inference-Header-Content-Length": str(len(header))})
    if answer.status != 200:
        return answer.status, answer.json(), b""
    length = int(answer.headers["inference-header-content-length"])
    return answer.status, json.loads(answer.body[:length]), answer.body[length:]


def output(described: dict[str, object], raw: bytes, name: str) -> np.ndarray:
    """One FP32 output out of a binary answer."""
    outputs = described["outputs"]
    assert isinstance(outputs, list)
    offset = 0
    for entry in outputs:
        size = entry["parameters"]["binary_data_size"]
        if entry["name"] == name:
            return np.frombuffer(raw[offset:offset + size], np.float32).reshape(entry["shape"])
        offset += size
    raise AssertionError(f"no output {name}")


def test_a_repeated_binary_header_decodes_each_bodys_own_tensors(
    open_gateway: RunningGateway,
) -> None:
    port = open_gateway.gateway.rest_port
    for step in range(4):  # same header every time; the data differ
        x = np.arange(8, dtype=np.float32).reshape(2, 4) * (step + 1)
        status, described, raw = binary("/v2/models/add/versions/1/infer", port, x)
        assert status == 200, described
        np.testing.assert_array_equal(output(described, raw, "y"), x + 1)
        np.testing.assert_array_equal(output(described, raw, "doubled"), x * 2)


def test_a_remembered_header_is_checked_again_for_each_version_and_model(
    open_gateway: RunningGateway,
) -> None:
    port = open_gateway.gateway.rest_port
    x = np.ones((1, 4), np.float32)
    for version, added in (("1", 1), ("2", 10), ("1", 1)):
        status, described, raw = binary(f"/v2/models/add/versions/{version}/infer", port, x)
        assert status == 200, described
        assert described["model_version"] == version
        np.testing.assert_array_equal(output(described, raw, "y"), x + added)
    # The same header bytes sent to a model whose input is named otherwise: refused by
    # that model's checks, then the first model still decodes from the plan.
    status, described, _ = binary("/v2/models/all_types/infer", port, x)
    assert status == 400 and "x" in str(described["error"])
    assert binary("/v2/models/add/versions/1/infer", port, x)[0] == 200


def test_a_remembered_header_with_too_few_or_too_many_bytes_is_refused(
    open_gateway: RunningGateway,
) -> None:
    port = open_gateway.gateway.rest_port
    x = np.ones((1, 4), np.float32)
    header = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 16}}]}).encode()
    length = {"Inference-Header-Content-Length": str(len(header))}
    path = "/v2/models/add/versions/1/infer"
    assert rest(port, "POST", path, header + x.tobytes(), length).status == 200
    short = rest(port, "POST", path, header + x.tobytes()[:12], length)
    assert short.status == 400 and "runs past the end" in short.json()["error"]
    extra = rest(port, "POST", path, header + x.tobytes() + b"\0", length)
    assert extra.status == 400 and "1 bytes of binary data follow" in extra.json()["error"]


def test_a_remembered_bytes_header_parses_each_bodys_elements(
    open_gateway: RunningGateway,
) -> None:
    port = open_gateway.gateway.rest_port
    inputs = []
    for datatype in ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16",
                     "INT32", "INT64", "FP16", "FP32", "FP64"):
        inputs.append((f"in_{datatype}", datatype, 3 * np.dtype(
            "bool" if datatype == "BOOL" else datatype.lower().replace("fp", "float")
        ).itemsize))
    for word in (b"abc", b"xyz"):  # same lengths: same header, different bytes
        elements = b"".join(len(w).to_bytes(4, "little") + w for w in (word, word, word))
        described = [{"name": n, "shape": [1, 3], "datatype": d,
                      "parameters": {"binary_data_size": size}} for n, d, size in inputs]
        described.append({"name": "in_BYTES", "shape": [1, 3], "datatype": "BYTES",
                          "parameters": {"binary_data_size": len(elements)}})
        header = json.dumps({"inputs": described,
                             "outputs": [{"name": "out_BYTES"}]}).encode()
        data = b"".join(bytes(size) for _, _, size in inputs) + elements
        answer = rest(port, "POST", "/v2/models/all_types/infer", header + data,
                      {"Inference-Header-Content-Length": str(len(header))})
        assert answer.status == 200, answer.body
        (out,) = answer.json()["outputs"]
        assert out["data"] == [word.decode()] * 3


def test_json_floats_nan_and_infinity_go_both_ways(open_gateway: RunningGateway) -> None:
    port = open_gateway.gateway.rest_port
    body = ('{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", '
            '"data": [NaN, Infinity, -Infinity, 0.5]}]}')
    answer = rest(port, "POST", "/v2/models/add/versions/1/infer", body)
    assert answer.status == 200, answer.body
    y = {o["name"]: o["data"] for o in answer.json()["outputs"]}["y"]
    assert math.isnan(y[0]) and y[1:] == [math.inf, -math.inf, 1.5]


def test_json_float_answers_read_back_to_the_same_float32(
    open_gateway: RunningGateway,
) -> None:
    port = open_gateway.gateway.rest_port
    x = np.array([[0.1, 1 / 3, 1e38, -1e-45]], np.float32)
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                        "data": x.tolist()}]}
    answer = rest(port, "POST", "/v2/models/add/versions/1/infer", body)
    assert answer.status == 200, answer.body
    doubled = {o["name"]: o["data"] for o in answer.json()["outputs"]}["doubled"]
    np.testing.assert_array_equal(np.array(doubled, np.float32), (x * 2).reshape(-1))


TYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
         "FP16", "FP32", "FP64", "BYTES")


@pytest.mark.parametrize(("data", "expected"), [
    ([1, 2, 2**64], "out of range for UINT64"),
    ([1, 2, -(2**63) - 1], "out of range for UINT64"),
    ([1, 2, 1.5], "element 2 is a number with a fraction"),
])
def test_integer_json_data_out_of_range_is_named(
    open_gateway: RunningGateway, data: list[object], expected: str
) -> None:
    port = open_gateway.gateway.rest_port
    zeros = {"BOOL": [False] * 3, "BYTES": ["a"] * 3}
    inputs = [{"name": f"in_{t}", "shape": [1, 3], "datatype": t,
               "data": data if t == "UINT64" else zeros.get(t, [0, 0, 0])} for t in TYPES]
    answer = rest(port, "POST", "/v2/models/all_types/infer", {"inputs": inputs})
    assert answer.status == 400, answer.body
    assert expected in answer.json()["error"]
