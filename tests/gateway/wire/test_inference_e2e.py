"""End-to-end: the real gateway on a loopback port, called with tritonclient and with our own
generated stubs — metadata, config, every datatype typed and raw, outputs, versions, errors."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from tritonclient.utils import InferenceServerException

from modelgate_pb import grpc_service_pb2 as pb
from tests.support import models
from tests.support.gateway import RunningGateway, running_gateway

WIDTH = 3
# A sample of every datatype, [2, WIDTH], with edge values where the type has them.
SAMPLES: dict[str, np.ndarray] = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "UINT8": np.array([[0, 1, 255], [7, 8, 9]], dtype=np.uint8),
    "UINT16": np.array([[0, 1, 65535], [7, 8, 9]], dtype=np.uint16),
    "UINT32": np.array([[0, 1, 2**32 - 1], [7, 8, 9]], dtype=np.uint32),
    "UINT64": np.array([[0, 1, 2**64 - 1], [7, 8, 9]], dtype=np.uint64),
    "INT8": np.array([[-128, 0, 127], [7, -8, 9]], dtype=np.int8),
    "INT16": np.array([[-32768, 0, 32767], [7, -8, 9]], dtype=np.int16),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1], [7, -8, 9]], dtype=np.int32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1], [7, -8, 9]], dtype=np.int64),
    "FP16": np.array([[0.5, -1.25, 65504], [1e-3, 2, 3]], dtype=np.float16),
    "FP32": np.array([[0.5, -1.25, 3.4e38], [1e-30, 2, 3]], dtype=np.float32),
    "FP64": np.array([[0.5, -1.25, 1e300], [1e-300, 2, 3]], dtype=np.float64),
    "BYTES": np.array([[b"", b"abc", "héllo".encode()], [b"x" * 100, b"\n\t", b"z"]],
                      dtype=object),
}
TYPED_FIELD = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
    "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    models.write_model(root, "all_types", 1, models.identity_all_types(WIDTH),
                       models.all_types_config(width=WIDTH))
    policy = "version_policy: { latest: { num_versions: 2 } }\n"
    for version in (1, 2, 3):
        config = models.add_model_config("adder", extra=policy) if version == 1 else None
        models.write_model(root, "adder", version, models.add_constant(float(version)), config)
    # Served with a config derived from the ONNX graph (no config.pbtxt).
    models.write_model(root, "derived", 1, models.add_constant(10.0), None)
    # Broken in different ways; each must be reported while the rest serves.
    models.write_model(root, "corrupt", 1, b"this is not onnx", models.add_model_config("corrupt"))
    models.write_model(root, "badconfig", 1, models.add_constant(1.0), "max_batch_size: banana")
    models.write_model(root, "mismatch", 1, models.add_constant(1.0),
                       models.add_model_config("mismatch", width=5))
    alien = models.add_model_config("alien").replace("onnxruntime_onnx", "pytorch_libtorch")
    models.write_model(root, "alien", 1, models.add_constant(1.0), alien)
    return root


@pytest.fixture(scope="module")
def gateway(store: Path) -> Iterator[RunningGateway]:
    with running_gateway(store) as gw:
        yield gw


def _input(name: str, array: np.ndarray, datatype: str) -> tc.InferInput:
    tensor = tc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _code(excinfo: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(excinfo.value.status())


# --- server and model metadata -------------------------------------------------------------

def test_server_live_ready_metadata(client: tc.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "modelgate"
    assert "model_configuration" in meta.extensions


def test_model_metadata_lists_versions_and_full_shapes(client: tc.InferenceServerClient) -> None:
    meta = client.get_model_metadata("adder")
    assert meta.versions == ["2", "3"]  # latest 2 of versions 1..3
    assert meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 4])]
    assert [t.name for t in meta.outputs] == ["y", "doubled"]


def test_model_config_is_tritons_message(client: tc.InferenceServerClient) -> None:
    config = client.get_model_config("adder").config
    assert config.name == "adder"
    assert config.max_batch_size == 8
    assert config.version_policy.latest.num_versions == 2
    assert [i.name for i in config.input] == ["x"]


def test_derived_config_from_onnx_graph(client: tc.InferenceServerClient) -> None:
    config = client.get_model_config("derived").config
    assert config.max_batch_size == 0
    assert [(i.name, list(i.dims)) for i in config.input] == [("x", [-1, 4])]
    x = _input("x", np.ones((2, 4), np.float32), "FP32")
    np.testing.assert_array_equal(client.infer("derived", [x]).as_numpy("y"), np.full((2, 4), 11.0))


# --- every datatype, raw and typed -------------------------------------------------------

def test_every_datatype_round_trips_raw_with_tritonclient(client: tc.InferenceServerClient) -> None:
    inputs = [_input(f"in_{t}", a, t) for t, a in SAMPLES.items()]
    result = client.infer("all_types", inputs, request_id="req-42")
    assert result.get_response().id == "req-42"
    for datatype, array in SAMPLES.items():
        got = result.as_numpy(f"out_{datatype}")
        assert got is not None and got.shape == array.shape, datatype
        np.testing.assert_array_equal(got, array, err_msg=datatype)
        assert result.get_output(f"out_{datatype}").datatype == datatype


def test_typed_contents_with_raw_fp16_is_rejected_as_mixed(gateway: RunningGateway) -> None:
    request = pb.ModelInferRequest(model_name="all_types")
    for datatype, array in SAMPLES.items():
        tensor = request.inputs.add(name=f"in_{datatype}", datatype=datatype, shape=array.shape)
        if datatype != "FP16":
            getattr(tensor.contents, TYPED_FIELD[datatype]).extend(array.reshape(-1).tolist())
    request.raw_input_contents.append(SAMPLES["FP16"].tobytes())
    with pytest.raises(grpc.RpcError) as excinfo:
        gateway.stub().ModelInfer(request, timeout=30)
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_every_datatype_round_trips_typed_with_our_stubs(tmp_path: Path) -> None:
    # FP16 travels only raw, so this model takes every other datatype as typed contents.
    store = tmp_path / "store"
    typed = {k: v for k, v in SAMPLES.items() if k != "FP16"}
    graph_model = models.identity_all_types(WIDTH)
    keep = {f"in_{t}" for t in typed} | {f"out_{t}" for t in typed}
    for part in (graph_model.graph.input, graph_model.graph.output):
        for value in [v for v in part if v.name not in keep]:
            part.remove(value)
    for node in [n for n in graph_model.graph.node if n.input[0] not in keep]:
        graph_model.graph.node.remove(node)
    config = models.config_pbtxt(
        "typed", [(f"in_{t}", t, [WIDTH]) for t in typed], [(f"out_{t}", t, [WIDTH]) for t in typed]
    )
    models.write_model(store, "typed", 1, graph_model, config)
    with running_gateway(store) as gw:
        request = pb.ModelInferRequest(model_name="typed")
        for datatype, array in typed.items():
            tensor = request.inputs.add(name=f"in_{datatype}", datatype=datatype,
                                        shape=array.shape)
            getattr(tensor.contents, TYPED_FIELD[datatype]).extend(array.reshape(-1).tolist())
            out = request.outputs.add(name=f"out_{datatype}")
            out.parameters["binary_data"].bool_param = False
        response = gw.stub().ModelInfer(request, timeout=30)
    assert not response.raw_output_contents
    by_name = {o.name: o for o in response.outputs}
    for datatype, array in typed.items():
        out = by_name[f"out_{datatype}"]
        assert out.datatype == datatype and list(out.shape) == list(array.shape)
        values = list(getattr(out.contents, TYPED_FIELD[datatype]))
        assert values == array.reshape(-1).tolist(), datatype


def test_requested_outputs_subset(client: tc.InferenceServerClient) -> None:
    x = _input("x", np.ones((1, 4), np.float32), "FP32")
    result = client.infer("adder", [x], outputs=[tc.InferRequestedOutput("doubled")])
    assert result.as_numpy("y") is None
    np.testing.assert_array_equal(result.as_numpy("doubled"), np.full((1, 4), 2.0))


# --- versions ------------------------------------------------------------------------------

def test_versions_resolve_and_response_names_the_version(client: tc.InferenceServerClient) -> None:
    x = _input("x", np.zeros((1, 4), np.float32), "FP32")
    latest = client.infer("adder", [x])
    assert latest.get_response().model_version == "3"
    np.testing.assert_array_equal(latest.as_numpy("y"), np.full((1, 4), 3.0))
    two = client.infer("adder", [x], model_version="2")
    assert two.get_response().model_version == "2"
    np.testing.assert_array_equal(two.as_numpy("y"), np.full((1, 4), 2.0))
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer("adder", [x], model_version="1")  # present on disk, outside the policy
    assert _code(excinfo) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer("adder", [x], model_version="stable")  # no such label
    assert _code(excinfo) == "StatusCode.NOT_FOUND"


def test_model_ready_per_version(client: tc.InferenceServerClient) -> None:
    assert client.is_model_ready("adder")
    assert client.is_model_ready("adder", "2")
    assert not client.is_model_ready("adder", "1")
    assert not client.is_model_ready("no_such_model")
    assert not client.is_model_ready("corrupt")


# --- broken models are reported, the rest serves -------------------------------------------

def test_broken_models_are_unavailable_with_reasons(client: tc.InferenceServerClient) -> None:
    index = {(m.name, m.version): m for m in client.get_model_repository_index().models}
    assert index[("all_types", "1")].state == "READY"
    assert index[("corrupt", "1")].state == "UNAVAILABLE"
    assert "cannot load" in index[("corrupt", "1")].reason
    assert index[("badconfig", "")].state == "UNAVAILABLE"
    assert "config.pbtxt" in index[("badconfig", "")].reason
    assert "shape" in index[("mismatch", "1")].reason
    assert "pytorch_libtorch" in index[("alien", "1")].reason
    ready = client.get_model_repository_index(as_json=True).get("models", [])
    assert all(m.get("state") for m in ready)


def test_unavailable_model_answers_unavailable(client: tc.InferenceServerClient) -> None:
    x = _input("x", np.ones((1, 4), np.float32), "FP32")
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer("corrupt", [x])
    assert _code(excinfo) == "StatusCode.UNAVAILABLE"


def test_model_ready_carries_the_reason_in_trailers(gateway: RunningGateway) -> None:
    _, call = gateway.stub().ModelReady.with_call(
        pb.ModelReadyRequest(name="corrupt", version="1"), timeout=10
    )
    trailers = dict(call.trailing_metadata() or ())
    assert "cannot load" in trailers["modelgate-reason"]


# --- bad input: a clear status, the server stays up ----------------------------------------

def _base(shape: tuple[int, ...] = (1, 4), datatype: str = "FP32",
          data: bytes | None = None, name: str = "x") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="adder")
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(
        np.ones((1, 4), np.float32).tobytes() if data is None else data
    )
    return request


def _both_contents() -> pb.ModelInferRequest:
    request = _base()
    request.inputs[0].contents.fp32_contents.extend([1, 2, 3, 4])
    return request


def _typed_count_wrong() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="adder")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    tensor.contents.fp32_contents.extend([1, 2, 3])
    return request


def _typed_wrong_field() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="adder")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    tensor.contents.int_contents.extend([1, 2, 3, 4])
    return request


def _raw_count_mismatch() -> pb.ModelInferRequest:
    request = _base()
    request.raw_input_contents.append(b"extra")
    return request


def _unknown_output() -> pb.ModelInferRequest:
    request = _base()
    request.outputs.add(name="nope")
    return request


def _duplicate_input() -> pb.ModelInferRequest:
    request = _base()
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    return request


CASES: dict[str, tuple[pb.ModelInferRequest, grpc.StatusCode, str]] = {
    "unknown model": (pb.ModelInferRequest(model_name="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
    "empty model name": (pb.ModelInferRequest(model_name=""), grpc.StatusCode.NOT_FOUND, "model"),
    "path-like model name": (pb.ModelInferRequest(model_name="../adder"),
                             grpc.StatusCode.NOT_FOUND, "unknown model"),
    "unknown version": (pb.ModelInferRequest(model_name="adder", model_version="99"),
                        grpc.StatusCode.NOT_FOUND, "99"),
    "malformed version": (pb.ModelInferRequest(model_name="adder", model_version="1; rm"),
                          grpc.StatusCode.INVALID_ARGUMENT, "model_version"),
    "wrong datatype": (_base(datatype="FP64", data=b"\0" * 32), grpc.StatusCode.INVALID_ARGUMENT,
                       "expected datatype FP32"),
    "unknown datatype": (_base(datatype="FP33"), grpc.StatusCode.INVALID_ARGUMENT, "FP33"),
    "wrong rank": (_base(shape=(4,)), grpc.StatusCode.INVALID_ARGUMENT, "rank"),
    "wrong dimension": (_base(shape=(1, 5), data=b"\0" * 20), grpc.StatusCode.INVALID_ARGUMENT,
                        "dimension 1 must be 4"),
    "byte size": (_base(data=b"\0" * 15), grpc.StatusCode.INVALID_ARGUMENT, "needs 16 bytes"),
    "negative dimension": (_base(shape=(-1, 4)), grpc.StatusCode.INVALID_ARGUMENT, "negative"),
    "huge dimension": (_base(shape=(2**62, 4)), grpc.StatusCode.INVALID_ARGUMENT,
                       "max_batch_size"),
    "batch too large": (_base(shape=(9, 4), data=b"\0" * 144), grpc.StatusCode.INVALID_ARGUMENT,
                        "exceeds the model's max_batch_size 8"),
    "zero rows": (_base(shape=(0, 4), data=b""), grpc.StatusCode.INVALID_ARGUMENT, ">= 1"),
    "unknown input": (_base(name="z"), grpc.StatusCode.INVALID_ARGUMENT, "no input 'z'"),
    "missing input": (pb.ModelInferRequest(model_name="adder"), grpc.StatusCode.INVALID_ARGUMENT,
                      "needs input"),
    "both contents and raw": (_both_contents(), grpc.StatusCode.INVALID_ARGUMENT, "both"),
    "typed element count": (_typed_count_wrong(), grpc.StatusCode.INVALID_ARGUMENT,
                            "needs 4 elements"),
    "typed wrong field": (_typed_wrong_field(), grpc.StatusCode.INVALID_ARGUMENT,
                          "fp32_contents"),
    "raw count mismatch": (_raw_count_mismatch(), grpc.StatusCode.INVALID_ARGUMENT,
                           "raw_input_contents has 2"),
    "unknown output": (_unknown_output(), grpc.StatusCode.INVALID_ARGUMENT, "no output 'nope'"),
    "duplicate input": (_duplicate_input(), grpc.StatusCode.INVALID_ARGUMENT, "more than once"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_requests_get_clear_statuses(gateway: RunningGateway, case: str) -> None:
    request, code, needle = CASES[case]
    with pytest.raises(grpc.RpcError) as excinfo:
        gateway.stub().ModelInfer(request, timeout=10)
    assert excinfo.value.code() == code, excinfo.value.details()
    assert needle in excinfo.value.details()


BYTES_CASES = {
    "prefix longer than data": struct.pack("<I", 100) + b"abc",
    "truncated prefix": b"\x01\x00",
    "trailing garbage": struct.pack("<I", 1) + b"a" + b"zz",
    "too few elements": struct.pack("<I", 1) + b"a",
    "huge claimed length": struct.pack("<I", 2**32 - 1) + b"a",
}


@pytest.mark.parametrize("case", sorted(BYTES_CASES))
def test_bad_bytes_elements(gateway: RunningGateway, case: str) -> None:
    request = pb.ModelInferRequest(model_name="all_types")
    for datatype, array in SAMPLES.items():
        request.inputs.add(name=f"in_{datatype}", datatype=datatype, shape=array.shape)
        if datatype == "BYTES":
            request.inputs[-1].shape[:] = [1, 2] if case == "too few elements" else [1, 1]
            request.raw_input_contents.append(BYTES_CASES[case])
        else:
            request.raw_input_contents.append(array.tobytes())
    with pytest.raises(grpc.RpcError) as excinfo:
        gateway.stub().ModelInfer(request, timeout=10)
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "in_BYTES" in excinfo.value.details() or "in_BOOL" in excinfo.value.details()


def test_server_still_serves_after_every_bad_request(client: tc.InferenceServerClient) -> None:
    x = _input("x", np.ones((2, 4), np.float32), "FP32")
    np.testing.assert_array_equal(client.infer("adder", [x]).as_numpy("y"), np.full((2, 4), 4.0))


def test_unimplemented_methods(gateway: RunningGateway) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        gateway.stub().CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest(), timeout=10)
    assert excinfo.value.code() == grpc.StatusCode.UNIMPLEMENTED


# --- health and reflection -----------------------------------------------------------------

def test_health_overall_and_per_model(gateway: RunningGateway) -> None:
    with grpc.insecure_channel(gateway.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        check = health_pb2.HealthCheckRequest
        assert health.Check(check(service=""), timeout=10).status == serving
        assert health.Check(check(service="inference.GRPCInferenceService"),
                            timeout=10).status == serving
        assert health.Check(check(service="adder"), timeout=10).status == serving
        assert health.Check(check(service="corrupt"), timeout=10).status == not_serving
        with pytest.raises(grpc.RpcError) as excinfo:
            health.Check(check(service="no_such_model"), timeout=10)
        assert excinfo.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("package", ["v1alpha", "v1"])
def test_reflection_lists_services(gateway: RunningGateway, package: str) -> None:
    # grpc.reflection.v1's messages are v1alpha's: the v1alpha stub's classes, other path.
    method = f"/grpc.reflection.{package}.ServerReflection/ServerReflectionInfo"
    with grpc.insecure_channel(gateway.target) as channel:
        call = channel.stream_stream(
            method, request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        asks = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol=f"grpc.reflection.{package}.ServerReflection")]
        listed, described = list(call(iter(asks), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    files = described.file_descriptor_response.file_descriptor_proto
    assert files and f"grpc.reflection.{package}".encode() in files[0]


def test_message_larger_than_the_limit_is_resource_exhausted(store: Path) -> None:
    with running_gateway(store, max_message_bytes=4096) as gw:
        client = tc.InferenceServerClient(gw.target)
        big = _input("x", np.ones((8, 4), np.float32), "FP32")
        request = pb.ModelInferRequest(model_name="adder", id="x" * 10_000)
        with pytest.raises(grpc.RpcError) as excinfo:
            gw.stub().ModelInfer(request, timeout=10)
        assert excinfo.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The server is still up and answers a request within the limit.
        assert client.infer("adder", [big]).as_numpy("y").shape == (8, 4)
        client.close()
