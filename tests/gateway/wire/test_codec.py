"""The hot path's codec: its hand-written answers are byte for byte what protobuf writes, a
cached plan never lets a request skip a check (its own, or the pipeline's spec check), and
the caches stay bounded."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.errors import InvalidRequestError
from gateway.models.served import ServedVersion
from gateway.pipeline import tensors as tensors_module
from gateway.pipeline.tensors import LayoutChecks, check_request
from gateway.wire import codec as codec_module
from gateway.wire.codec import RequestDecoder, ResponseEncoder
from gateway.wire.conversion import decode_request, encode_response
from model_store.datatypes import DataType
from model_store.errors import InputMismatchError
from model_store.spec import ModelId, ModelSpec, TensorSpec
from modelgate_pb import grpc_service_pb2 as pb
from runtimes.base import InferRequest

SPEC = ModelSpec(
    name="m", platform="onnxruntime_onnx", backend="", max_batch_size=8,
    inputs=(TensorSpec("x", DataType.FP32, (4,)), TensorSpec("n", DataType.INT64, (1,))),
    outputs=(
        TensorSpec("y", DataType.FP32, (4,)),
        TensorSpec("label", DataType.INT64, (1,)),
        TensorSpec("name", DataType.BYTES, (1,)),
        TensorSpec("half", DataType.FP16, (2,)),
    ),
)


class Codec:
    """The decode path as a ModelInfer takes it: the adapter's decoder, then the pipeline's
    spec check against one version."""

    def __init__(self, spec: ModelSpec = SPEC) -> None:
        self.decoder = RequestDecoder()
        self.checks = LayoutChecks()
        self.version = ServedVersion(ModelId(spec.name, 1), spec)

    def decode(self, message: pb.ModelInferRequest) -> InferRequest:
        return self.checks.check(self.version, self.decoder.decode(message))


def full_checks(message: pb.ModelInferRequest, spec: ModelSpec = SPEC) -> InferRequest:
    decoded = decode_request(message)
    decoded.request.rows = check_request(spec, decoded)
    return decoded.request


def request(rows: int = 2, request_id: str = "") -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="m", id=request_id)
    message.inputs.add(name="x", datatype="FP32", shape=[rows, 4])
    message.inputs.add(name="n", datatype="INT64", shape=[rows, 1])
    message.raw_input_contents.append(np.arange(rows * 4, dtype=np.float32).tobytes())
    message.raw_input_contents.append(np.arange(rows, dtype=np.int64).tobytes())
    return message


def outputs(rows: int) -> dict[str, np.ndarray]:
    return {
        "y": np.linspace(-1, 1, rows * 4, dtype=np.float32).reshape(rows, 4),
        "label": np.arange(rows, dtype=np.int64).reshape(rows, 1),
        "name": np.array([[f"é{i}".encode()] for i in range(rows)], dtype=object),
        "half": np.full((rows, 2), 0.5, dtype=np.float16),
    }


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("request_id", ["", "req-7", "ü" * 300])
def test_answer_bytes_equal_protobufs_own(rows: int, request_id: str) -> None:
    codec = ResponseEncoder(SPEC, 12)
    message = request(rows, request_id)
    ours = codec.encode(message, outputs(rows))
    assert isinstance(ours, bytes)
    theirs = encode_response(message, SPEC, 12, outputs(rows)).SerializeToString()
    assert ours == theirs
    parsed = pb.ModelInferResponse.FromString(ours)
    assert parsed.model_version == "12"
    assert parsed.id == request_id
    assert list(parsed.outputs[0].shape) == [rows, 4]


def test_outputs_are_converted_to_the_declared_type_and_layout() -> None:
    codec = ResponseEncoder(SPEC, 1)
    # A float64, column-major array for an FP32 output: written as FP32, row-major.
    y = np.asfortranarray(np.arange(8, dtype=np.float64).reshape(2, 4))
    parsed = pb.ModelInferResponse.FromString(codec.encode(request(), {"y": y}))
    got = np.frombuffer(parsed.raw_output_contents[0], dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(got, y.astype(np.float32))


def test_typed_contents_still_come_as_a_message() -> None:
    codec = ResponseEncoder(SPEC, 1)
    message = request()
    wanted = message.outputs.add(name="label")
    wanted.parameters["binary_data"].bool_param = False
    answer = codec.encode(message, {"label": outputs(2)["label"]})
    assert isinstance(answer, pb.ModelInferResponse)
    assert list(answer.outputs[0].contents.int64_contents) == [0, 1]


def test_a_cached_layout_decodes_like_the_full_checks() -> None:
    codec = Codec()
    first = codec.decode(request())
    second = codec.decode(request())  # from the plans
    expected = full_checks(request())
    for decoded in (first, second):
        assert decoded.rows == expected.rows == 2
        assert decoded.outputs == expected.outputs
        for name in ("x", "n"):
            np.testing.assert_array_equal(decoded.inputs[name], expected.inputs[name])
            assert decoded.inputs[name].dtype == expected.inputs[name].dtype


def test_a_cached_layout_still_checks_each_requests_bytes() -> None:
    codec = Codec()
    codec.decode(request())
    short = request()
    short.raw_input_contents[0] = short.raw_input_contents[0][:-4]
    with pytest.raises(InvalidRequestError, match=r"input 'x'.*needs 32 bytes"):
        codec.decode(short)
    both = request()
    both.inputs[1].contents.int64_contents.extend([1, 2])
    with pytest.raises(InvalidRequestError, match="both raw_input_contents and typed"):
        codec.decode(both)
    codec.decode(request())  # and the layout still serves good requests


def test_parameters_are_read_on_every_request() -> None:
    codec = Codec()
    codec.decode(request())
    with_priority = request()
    with_priority.parameters["priority"].int64_param = 2
    with_priority.parameters["timeout"].uint64_param = 500
    decoded = codec.decode(with_priority)
    assert (decoded.priority, decoded.timeout_us) == (2, 500)
    bad = request()
    bad.parameters["priority"].string_param = "high"
    with pytest.raises(InvalidRequestError, match="priority"):
        codec.decode(bad)


def test_bad_layouts_are_never_cached_and_always_rejected() -> None:
    codec = Codec()
    wrong = request()
    wrong.inputs[0].datatype = "FP64"
    for _ in range(3):
        with pytest.raises(InputMismatchError, match="expected datatype FP32"):
            codec.decode(wrong)
    assert not codec.checks._versions[codec.version]


def test_the_caches_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec_module, "MAX_PLANS", 5)
    monkeypatch.setattr(codec_module, "MAX_METAS", 5)
    monkeypatch.setattr(tensors_module, "MAX_LAYOUTS", 5)
    codec = Codec()
    encoder = ResponseEncoder(SPEC, 1)
    # Batch sizes times requested-output subsets: 32 layouts, more than the caches hold.
    for index in range(32):
        rows = 1 + index % 8
        message = request(rows)
        names = ("y", "label", "name", "half")[: 1 + index // 8]
        for name in names:
            message.outputs.add(name=name)
        decoded = codec.decode(message)
        assert decoded.rows == rows
        all_outputs = outputs(rows)
        answer = encoder.encode(message, {n: all_outputs[n] for n in names})
        assert isinstance(answer, bytes)
        assert [o.name for o in pb.ModelInferResponse.FromString(answer).outputs] == list(names)
    # Full tables start over (plans, checked layouts) or stop growing (output metadata).
    assert 0 < len(codec.decoder._plans) <= 5
    assert 0 < len(codec.checks._versions[codec.version]) <= 5
    assert len(encoder._metas) == 5


def test_long_outputs_and_ids_encode_like_protobuf() -> None:
    # Lengths past two varint bytes (16384) and past three (2**21).
    spec = ModelSpec(
        name="big", platform="onnxruntime_onnx", backend="", max_batch_size=4,
        inputs=(TensorSpec("x", DataType.FP32, (1,)),),
        outputs=(TensorSpec("y", DataType.FP32, (600_000,)),),
    )
    message = pb.ModelInferRequest(model_name="big", id="i" * 20_000)
    y = np.random.default_rng(1).normal(size=(1, 600_000)).astype(np.float32)
    ours = ResponseEncoder(spec, 3).encode(message, {"y": y})
    assert ours == encode_response(message, spec, 3, {"y": y}).SerializeToString()
