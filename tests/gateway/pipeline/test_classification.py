"""The classification extension (Triton's protocol/extension_classification) over both
transports with tritonclient, unchanged: the top k of each row as BYTES "value:index" or
"value:index:label" (the output's label_filename), and clear refusals of a bad count or a
non-numeric output."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from gateway.pipeline.classification import classify
from model_store.class_labels import read_labels
from model_store.config import parse_config_text, spec_from_config
from model_store.errors import ModelConfigError
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc
from tests.gateway.http.conftest import rest
from tests.support import models
from tests.support.gateway import RunningGateway, running_gateway

pytestmark = pytest.mark.timeout(180)

LABELS = "cat\ndog\nbird\n"  # three labels for four classes: class 3 has none
SCORES_CONFIG = (
    'name: "scores"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
    'input { name: "x" data_type: TYPE_FP32 dims: [4] }\n'
    'output { name: "y" data_type: TYPE_FP32 dims: [4] label_filename: "labels.txt" }\n'
    'output { name: "doubled" data_type: TYPE_FP32 dims: [4] }\n'
)
X = np.array([[0.5, 3.0, 1.0, 2.0], [4.0, 1.0, 1.0, 9.0]], dtype=np.float32)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    store = tmp_path_factory.mktemp("classification-store")
    models.write_model(store, "scores", 1, models.add_constant(0.0), SCORES_CONFIG)
    (store / "scores" / "labels.txt").write_text(LABELS, encoding="utf-8")
    models.write_model(store, "all_types", 1, models.identity_all_types(),
                       models.all_types_config())
    with running_gateway(store, http_port=0) as running:
        yield running


def _expected(k: int) -> np.ndarray:
    labels = LABELS.split()
    rows = []
    for row in X:
        order = sorted(range(4), key=lambda i: (-row[i], i))[:k]
        rows.append([(f"{row[i]:f}:{i}" + (f":{labels[i]}" if i < 3 else "")).encode()
                     for i in order])
    return np.array(rows, dtype=np.object_)


def test_grpc_class_count_answers_top_classes_with_labels(gateway: RunningGateway) -> None:
    client = grpcclient.InferenceServerClient(gateway.target)
    inp = grpcclient.InferInput("x", [2, 4], "FP32")
    inp.set_data_from_numpy(X)
    outputs = [grpcclient.InferRequestedOutput("y", class_count=3),
               grpcclient.InferRequestedOutput("doubled", class_count=9)]
    result = client.infer("scores", [inp], outputs=outputs)
    y = result.get_output("y")
    assert y.datatype == "BYTES" and list(y.shape) == [2, 3]
    np.testing.assert_array_equal(result.as_numpy("y"), _expected(3))
    # More classes asked than a row has: every class; no label file: "value:index".
    doubled = result.as_numpy("doubled")
    assert doubled.shape == (2, 4)
    assert doubled[1].tolist() == [b"18.000000:3", b"8.000000:0", b"2.000000:1", b"2.000000:2"]
    client.close()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_class_count_answers_top_classes_with_labels(
    gateway: RunningGateway, binary: bool
) -> None:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{gateway.gateway.rest_port}")
    inp = httpclient.InferInput("x", [2, 4], "FP32")
    inp.set_data_from_numpy(X, binary_data=binary)
    out = httpclient.InferRequestedOutput("y", binary_data=binary, class_count=2)
    for _ in range(2):  # the second time from the remembered header plan
        result = client.infer("scores", [inp], outputs=[out])
        assert result.get_output("y")["datatype"] == "BYTES"
        got = result.as_numpy("y")
        if not binary:  # JSON data: BYTES elements arrive as strings
            got = np.vectorize(str.encode, otypes=[np.object_])(got)
        np.testing.assert_array_equal(got, _expected(2))
    client.close()


def test_integer_output_is_ranked_as_integers(gateway: RunningGateway) -> None:
    client = grpcclient.InferenceServerClient(gateway.target)
    inputs = []
    for name in models.ONNX_TYPES:
        data = (np.array([[True, False, True]]) if name == "BOOL"
                else np.array([[b"a", b"b", b"c"]], dtype=np.object_) if name == "BYTES"
                else np.array([[7, 9, 8]]).astype(name.lower().replace("fp", "float")))
        inp = grpcclient.InferInput(f"in_{name}", [1, 3], name)
        inp.set_data_from_numpy(data)
        inputs.append(inp)
    result = client.infer("all_types", inputs, outputs=[
        grpcclient.InferRequestedOutput("out_UINT64", class_count=2)])
    assert result.as_numpy("out_UINT64").tolist() == [[b"9:1", b"8:2"]]
    for name in ("BYTES", "BOOL"):
        with pytest.raises(InferenceServerException) as caught:
            client.infer("all_types", inputs, outputs=[
                grpcclient.InferRequestedOutput(f"out_{name}", class_count=1)])
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert f"output 'out_{name}' is {name}; classification needs a numeric" in str(
            caught.value)
    client.close()


@pytest.mark.parametrize("value", [
    pb.InferParameter(int64_param=0), pb.InferParameter(int64_param=-3),
    pb.InferParameter(string_param="2"), pb.InferParameter(bool_param=True),
])
def test_grpc_bad_class_count_is_invalid_argument(
    gateway: RunningGateway, value: pb.InferParameter
) -> None:
    request = pb.ModelInferRequest(model_name="scores", raw_input_contents=[X.tobytes()])
    request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    output = request.outputs.add(name="y")
    output.parameters["classification"].CopyFrom(value)
    with grpc.insecure_channel(gateway.target) as channel, pytest.raises(
        grpc.RpcError
    ) as caught:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "output 'y': classification must be a positive integer count" in str(
        caught.value.details())


@pytest.mark.parametrize("value", [0, -1, "3", 2.5, True, None])
def test_http_bad_class_count_is_400(gateway: RunningGateway, value: object) -> None:
    body = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32",
                        "data": X.reshape(-1).tolist()}],
            "outputs": [{"name": "y", "parameters": {"classification": value}}]}
    answer = rest(gateway.gateway.rest_port, "POST", "/v2/models/scores/infer", body)
    assert answer.status == 400
    assert "classification must be a positive integer count" in answer.json()["error"]


def test_unbatched_output_ranks_all_its_elements() -> None:
    spec = spec_from_config(parse_config_text(
        'input { name: "x" data_type: TYPE_INT32 dims: [2, 2] }\n'
        'output { name: "y" data_type: TYPE_INT32 dims: [2, 2] }\n', "flat"))
    answered = classify(spec, {"y": np.array([[1, 5], [3, 5]], dtype=np.int32)}, {"y": 3})
    assert answered["y"].tolist() == [b"5:1", b"5:3", b"3:2"]


def test_label_file_must_be_a_file_of_the_model_folder(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("a\nb\n", encoding="utf-8")
    assert read_labels(tmp_path, "labels.txt") == ("a", "b")
    for name in ("../labels.txt", "/etc/passwd", "..", "missing.txt"):
        with pytest.raises(ModelConfigError):
            read_labels(tmp_path, name)
    (tmp_path / "link.txt").symlink_to(tmp_path / "labels.txt")
    with pytest.raises(ModelConfigError, match="not a regular file"):
        read_labels(tmp_path, "link.txt")
