"""Property tests: hypothesis builds ModelInferRequests, valid and broken in every way the
wire allows, and sends them to the real server. Each answer is the correct output or a
clean INVALID_ARGUMENT / NOT_FOUND / RESOURCE_EXHAUSTED, the server stays up, and a broken
request never changes the answers of the valid requests batched with it."""

from __future__ import annotations

import asyncio
import http.client
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from gateway.wire.conversion import MAX_ELEMENTS
from model_store.datatypes import DataType
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc
from tests.support import models
from tests.support.gateway import RunningGateway, running_gateway

pytestmark = pytest.mark.timeout(600)

CLEAN = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                   grpc.StatusCode.RESOURCE_EXHAUSTED})
WIDTH = 3  # identity_all_types' width
TYPES = list(models.ONNX_TYPES)
TYPED_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
names = st.one_of(st.sampled_from([f"in_{t}" for t in TYPES] + ["x", "y", "out_FP32"]),
                  st.text(max_size=12))
dims = st.one_of(st.integers(-3, 10), st.sampled_from([2**31, MAX_ELEMENTS, 2**62, 2**63 - 1,
                                                       -(2**63)]))


def echo_bytes_model() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["t"])], "echo_bytes",
        [helper.make_tensor_value_info("s", TensorProto.STRING, ["batch", 1])],
        [helper.make_tensor_value_info("t", TensorProto.STRING, ["batch", 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return bytes(model.SerializeToString())


@pytest.fixture(scope="module")
def gateway(hardening_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
    RunningGateway
]:
    root = tmp_path_factory.mktemp("property-store")
    for name in ("add", "batched", "all_types", "any_shape"):
        for path in (hardening_store / name).rglob("*"):
            target = root / path.relative_to(hardening_store)
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
    models.write_model(root, "echo_bytes", 1, echo_bytes_model(), models.config_pbtxt(
        "echo_bytes", [("s", "BYTES", [1])], [("t", "BYTES", [1])], max_batch_size=8,
        extra="dynamic_batching { max_queue_delay_microseconds: 20000 }\n"))
    with running_gateway(root, http_port=0) as gw:
        yield gw


# ---- generating requests --------------------------------------------------------------

def raw_bytes(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


@st.composite
def tensor_data(draw: st.DrawFn, datatype: str, count: int) -> np.ndarray:
    if datatype == "BYTES":
        alphabet = st.characters(min_codepoint=32, max_codepoint=0x2FF)
        words = draw(st.lists(st.text(alphabet, max_size=6), min_size=count, max_size=count))
        return np.array([w.encode() for w in words], dtype=object)
    dtype = DataType.from_wire(datatype).numpy_dtype
    if datatype == "BOOL":
        values = draw(st.lists(st.booleans(), min_size=count, max_size=count))
        return np.array(values, dtype=np.bool_)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)  # type: ignore[type-var]
        ints = st.integers(int(info.min), int(info.max))
        return np.array(draw(st.lists(ints, min_size=count, max_size=count)), dtype=dtype)
    floats = st.floats(width=16 if datatype == "FP16" else 32 if datatype == "FP32" else 64,
                       allow_nan=False)
    return np.array(draw(st.lists(floats, min_size=count, max_size=count)), dtype=dtype)


def encode(datatype: str, array: np.ndarray) -> bytes:
    if datatype == "BYTES":
        return raw_bytes(list(array.reshape(-1)))
    return array.tobytes()


@st.composite
def valid_all_types(draw: st.DrawFn) -> tuple[pb.ModelInferRequest, dict[str, bytes]]:
    """A valid request for all_types (raw, as FP16 must be): every input, in any order."""
    rows = draw(st.integers(1, 3))
    request = pb.ModelInferRequest(model_name="all_types", id=draw(st.text(max_size=8)))
    raws: dict[str, bytes] = {}
    for datatype in draw(st.permutations(TYPES)):
        array = draw(tensor_data(datatype, rows * WIDTH))
        request.inputs.add(name=f"in_{datatype}", datatype=datatype, shape=[rows, WIDTH])
        raws[datatype] = encode(datatype, array)
        request.raw_input_contents.append(raws[datatype])
    for datatype in draw(st.lists(st.sampled_from(TYPES), unique=True, max_size=3)):
        request.outputs.add(name=f"out_{datatype}")
    return request, raws


@st.composite
def valid_add(draw: st.DrawFn, model: str) -> tuple[pb.ModelInferRequest, np.ndarray]:
    rows = draw(st.integers(1, 4))
    x = draw(tensor_data("FP32", rows * 4)).reshape(rows, 4)
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[rows, 4])
    if draw(st.booleans()):
        request.raw_input_contents.append(x.tobytes())
    else:
        tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    return request, x


@st.composite
def valid_any_shape(draw: st.DrawFn) -> pb.ModelInferRequest:
    shape = [draw(st.integers(0, 4)), draw(st.integers(0, 4))]
    x = draw(tensor_data("FP32", shape[0] * shape[1]))
    request = pb.ModelInferRequest(model_name="any_shape")
    tensor = request.inputs.add(name="a", datatype="FP32", shape=shape)
    if draw(st.booleans()):
        request.raw_input_contents.append(x.tobytes())
    else:
        tensor.contents.fp32_contents.extend(x.tolist())
    return request


@st.composite
def mutated(draw: st.DrawFn) -> pb.ModelInferRequest:
    """A valid request of some model with zero or more breakages applied."""
    kind = draw(st.sampled_from(["all_types", "add", "batched", "any_shape"]))
    if kind == "all_types":
        request, _ = draw(valid_all_types())
    elif kind == "any_shape":
        request = draw(valid_any_shape())
    else:
        request, _ = draw(valid_add(kind))
    for _ in range(draw(st.integers(0, 3))):
        breakage = draw(st.sampled_from(BREAKAGES))
        breakage(draw, request)
    return request


def _pick(draw: st.DrawFn, request: pb.ModelInferRequest) -> int | None:
    return draw(st.integers(0, len(request.inputs) - 1)) if request.inputs else None


def drop_input(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    index = _pick(draw, request)
    if index is not None:
        del request.inputs[index]
        if request.raw_input_contents:
            del request.raw_input_contents[index]


def duplicate_input(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    index = _pick(draw, request)
    if index is not None:
        request.inputs.add().CopyFrom(request.inputs[index])
        if request.raw_input_contents:
            request.raw_input_contents.append(request.raw_input_contents[index])


def rename_input(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    index = _pick(draw, request)
    if index is not None:
        request.inputs[index].name = draw(names)


def change_datatype(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    index = _pick(draw, request)
    if index is not None:
        request.inputs[index].datatype = draw(st.one_of(st.sampled_from([*TYPES, "BF16"]),
                                                        st.text(max_size=8)))


def change_shape(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    index = _pick(draw, request)
    if index is not None:
        shape = request.inputs[index].shape
        del shape[:]
        shape.extend(draw(st.lists(dims, max_size=18)))


def resize_raw(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    if request.raw_input_contents:
        index = draw(st.integers(0, len(request.raw_input_contents) - 1))
        data = request.raw_input_contents[index]
        cut = draw(st.integers(-8, 8))
        request.raw_input_contents[index] = data[:cut] if cut < 0 else data + b"\x07" * cut


def corrupt_prefix(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    """Overwrite 4 bytes of a raw tensor (for BYTES: a length prefix, with a huge one)."""
    if request.raw_input_contents:
        index = draw(st.integers(0, len(request.raw_input_contents) - 1))
        data = bytearray(request.raw_input_contents[index])
        if len(data) >= 4:
            at = draw(st.integers(0, len(data) - 4))
            data[at:at + 4] = struct.pack("<I", draw(st.sampled_from([0, 1, 2**31, 2**32 - 1])))
            request.raw_input_contents[index] = bytes(data)


def mix_typed_into_raw(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    index = _pick(draw, request)
    if index is not None:
        request.inputs[index].contents.fp32_contents.append(1.0)
        if not request.raw_input_contents:
            request.raw_input_contents.append(b"\0" * 4)


def wrong_typed_field(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    index = _pick(draw, request)
    if index is not None:
        field = draw(st.sampled_from(sorted(set(TYPED_FIELD.values()))))
        values = getattr(request.inputs[index].contents, field)
        values.append(b"\xff" if field == "bytes_contents" else 1)


def extra_raw_entry(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    request.raw_input_contents.append(draw(st.binary(max_size=16)))


def bad_outputs(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    for name in draw(st.lists(names, min_size=1, max_size=3)):
        request.outputs.add(name=name)


def bad_model(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    if draw(st.booleans()):
        request.model_name = draw(st.one_of(st.text(max_size=20),
                                            st.sampled_from(["", "..", "../all_types"])))
    else:
        request.model_version = draw(st.one_of(st.text(max_size=8),
                                               st.sampled_from(["2", "0", "-1", "99" * 20])))


def bad_parameter(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    key = draw(st.sampled_from(["priority", "timeout", "binary_data", "sequence_id"]))
    param = request.parameters[key]
    choice = draw(st.integers(0, 2))
    if choice == 0:
        param.int64_param = draw(st.integers(-(2**63), 2**63 - 1))
    elif choice == 1:
        param.string_param = draw(st.text(max_size=8))
    else:
        param.bool_param = True


BREAKAGES = [drop_input, duplicate_input, rename_input, change_datatype, change_shape,
             resize_raw, corrupt_prefix, mix_typed_into_raw, wrong_typed_field,
             extra_raw_entry, bad_outputs, bad_model, bad_parameter]


# ---- checking answers -----------------------------------------------------------------

def check_answer(request: pb.ModelInferRequest, response: pb.ModelInferResponse) -> None:
    """An OK answer must be the right one for what was sent."""
    assert response.id == request.id
    if request.model_name == "all_types":
        sent = {t.name: request.raw_input_contents[i] for i, t in enumerate(request.inputs)}
        for index, output in enumerate(response.outputs):
            assert output.name.startswith("out_")
            assert response.raw_output_contents[index] == sent[f"in_{output.name[4:]}"]
        wanted = {o.name for o in request.outputs}
        assert not wanted or wanted == {o.name for o in response.outputs}
    elif request.model_name == "any_shape":
        tensor = request.inputs[0]
        data = (request.raw_input_contents[0] if request.raw_input_contents
                else np.array(tensor.contents.fp32_contents, np.float32).tobytes())
        assert list(response.outputs[0].shape) == list(tensor.shape)
        assert response.raw_output_contents[0] == data
    elif request.model_name in ("add", "batched"):
        tensor = request.inputs[0]
        if request.raw_input_contents:
            x = np.frombuffer(request.raw_input_contents[0], np.float32)
        else:
            x = np.array(tensor.contents.fp32_contents, np.float32)
        names = [o.name for o in response.outputs]
        y = np.frombuffer(response.raw_output_contents[names.index("y")], np.float32)
        np.testing.assert_array_equal(y, x + np.float32(1))


def send(stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest) -> None:
    try:
        response = stub.ModelInfer(request, timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() in CLEAN, (exc.code(), exc.details(), request)
        details = exc.details() or ""
        assert "Traceback" not in details and "\n" not in details
        return
    check_answer(request, response)


@given(pair=valid_all_types())
def test_valid_requests_of_every_datatype_get_their_own_data_back(
    gateway: RunningGateway, pair: tuple[pb.ModelInferRequest, dict[str, bytes]]
) -> None:
    request, _ = pair
    with grpc.insecure_channel(gateway.target) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    check_answer(request, response)


@given(request=mutated())
def test_any_request_gets_the_right_answer_or_a_clean_error(
    gateway: RunningGateway, request: pb.ModelInferRequest
) -> None:
    with grpc.insecure_channel(gateway.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        send(stub, request)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live


@st.composite
def bytes_request(draw: st.DrawFn) -> pb.ModelInferRequest:
    """echo_bytes requests: raw or typed, any bytes (not UTF-8 fails in the runtime, after
    batching), possibly broken further."""
    rows = draw(st.integers(1, 3))
    elements = draw(st.lists(st.binary(max_size=6), min_size=rows, max_size=rows))
    request = pb.ModelInferRequest(model_name="echo_bytes")
    tensor = request.inputs.add(name="s", datatype="BYTES", shape=[rows, 1])
    if draw(st.booleans()):
        request.raw_input_contents.append(raw_bytes(elements))
    else:
        tensor.contents.bytes_contents.extend(elements)
    for _ in range(draw(st.integers(0, 1))):
        draw(st.sampled_from([resize_raw, corrupt_prefix, change_shape]))(draw, request)
    return request


@given(broken=st.one_of(bytes_request(), mutated()), seed=st.integers(0, 2**16))
def test_a_broken_request_never_changes_the_answers_batched_with_it(
    gateway: RunningGateway, broken: pb.ModelInferRequest, seed: int
) -> None:
    model = "echo_bytes" if broken.model_name == "echo_bytes" else "batched"
    rng = np.random.default_rng(seed)
    companions: list[tuple[pb.ModelInferRequest, np.ndarray]] = []
    for index in range(3):
        request = pb.ModelInferRequest(model_name=model, id=f"companion-{index}")
        if model == "echo_bytes":
            words = np.array([f"w{seed}-{index}-{r}".encode() for r in range(2)], dtype=object)
            request.inputs.add(name="s", datatype="BYTES", shape=[2, 1])
            request.raw_input_contents.append(raw_bytes(list(words)))
            companions.append((request, words))
        else:
            x = rng.standard_normal((2, 4)).astype(np.float32)
            request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
            request.raw_input_contents.append(x.tobytes())
            companions.append((request, x))

    async def together() -> list[pb.ModelInferResponse | BaseException]:
        async with grpc.aio.insecure_channel(gateway.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            calls = [stub.ModelInfer(r, timeout=30) for r, _ in companions]
            calls.insert(1, stub.ModelInfer(broken, timeout=30))  # in the same batch window
            return list(await asyncio.gather(*calls, return_exceptions=True))

    answers = asyncio.run(together())
    broken_answer = answers.pop(1)
    if isinstance(broken_answer, grpc.RpcError):
        assert broken_answer.code() in CLEAN, (broken_answer.code(), broken_answer.details())
    else:
        assert isinstance(broken_answer, pb.ModelInferResponse), broken_answer
        if broken.model_name != "echo_bytes":
            check_answer(broken, broken_answer)
    for (request, data), answer in zip(companions, answers, strict=True):
        assert isinstance(answer, pb.ModelInferResponse), answer
        assert answer.id == request.id
        if model == "echo_bytes":
            raw = answer.raw_output_contents[0]
            assert raw == raw_bytes(list(data))
        else:
            y = np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(2, 4)
            np.testing.assert_array_equal(y, data + np.float32(1))


# ---- the REST port's JSON bodies ----------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)


def post_json(port: int, path: str, body: bytes) -> tuple[int, object]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", path, body=body)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def nest(values: list[object], rows: int) -> list[object]:
    return [values[r * WIDTH:(r + 1) * WIDTH] for r in range(rows)]


@st.composite
def valid_json_all_types(draw: st.DrawFn) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    """A valid JSON body for all_types: every input as JSON data, flat or nested."""
    rows = draw(st.integers(1, 3))
    inputs, sent = [], {}
    for datatype in draw(st.permutations(TYPES)):
        array = draw(tensor_data(datatype, rows * WIDTH))
        values: list[object] = ([v.decode() for v in array] if datatype == "BYTES"
                                else array.tolist())
        data = nest(values, rows) if draw(st.booleans()) else values
        inputs.append({"name": f"in_{datatype}", "shape": [rows, WIDTH],
                       "datatype": datatype, "data": data})
        sent[datatype] = array
    return {"inputs": inputs}, sent


# Hypothesis makes FP16 and FP32 values by drawing wider floats and rejecting those the
# narrower width cannot hold ("reject() in downcast": about 3 in 4 examples of thirteen
# tensors); that count is its own, so its filter health check says nothing here.
@settings(suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(pair=valid_json_all_types())
def test_valid_json_bodies_of_every_datatype_get_their_own_data_back(
    gateway: RunningGateway, pair: tuple[dict[str, object], dict[str, np.ndarray]]
) -> None:
    body, sent = pair
    status, answer = post_json(gateway.gateway.rest_port, "/v2/models/all_types/infer",
                               json.dumps(body).encode())
    assert status == 200, answer
    assert isinstance(answer, dict)
    outputs = {o["name"]: o["data"] for o in answer["outputs"]}
    for datatype, array in sent.items():
        got = outputs[f"out_{datatype}"]
        if datatype == "BYTES":
            assert [g.encode() for g in got] == list(array)
        else:
            np.testing.assert_array_equal(np.array(got, dtype=array.dtype), array)


@st.composite
def mutated_json(draw: st.DrawFn) -> bytes:
    """A valid add body with one part replaced by arbitrary JSON, or arbitrary bytes."""
    body: dict[str, object] = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                           "data": [1.0, 2.0, 3.0, 4.0]}]}
    where = draw(st.sampled_from(["body", "inputs", "input", "name", "shape", "datatype",
                                  "data", "parameters", "outputs", "bytes"]))
    junk = draw(json_values)
    if where == "bytes":
        return draw(st.binary(max_size=64))
    if where == "body":
        return json.dumps(junk).encode()
    if where in ("inputs", "outputs", "parameters"):
        body[where] = junk
    else:
        inputs = body["inputs"]
        assert isinstance(inputs, list)
        if where == "input":
            inputs[0] = junk
        else:
            inputs[0][where] = junk
    return json.dumps(body).encode()


@given(body=mutated_json())
def test_any_json_body_gets_the_right_answer_or_a_clean_error(
    gateway: RunningGateway, body: bytes
) -> None:
    port = gateway.gateway.rest_port
    status, answer = post_json(port, "/v2/models/add/infer", body)
    assert isinstance(answer, dict)
    if status == 200:
        assert {o["name"] for o in answer["outputs"]} == {"y", "doubled"}
    else:
        assert status in (400, 404, 413), (status, answer)
        assert isinstance(answer["error"], str) and answer["error"]
    good = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                   "data": [1, 2, 3, 4]}]}).encode()
    assert post_json(port, "/v2/models/add/infer", good)[0] == 200
