"""Triton's system shared memory extension (protocol/extension_shared_memory) over both
transports with tritonclient and tritonclient.utils.shared_memory, unchanged: register,
infer with inputs read from and outputs written to regions, status, unregister; and the
hostile cases: offsets and sizes past a region, unregistered names, another tenant's
region or object, keys that try to leave /dev/shm, the per-tenant bound; CUDA shared
memory answers UNIMPLEMENTED / 501 naming it."""

from __future__ import annotations

import os
import queue
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from gateway.pipeline.shared_memory import MAX_REGIONS
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc
from tests.gateway.http.conftest import rest
from tests.gateway.tenancy.test_tenants import admin, issue
from tests.support import models
from tests.support.gateway import RunningGateway, running_gateway

pytestmark = pytest.mark.timeout(180)

X = np.arange(8, dtype=np.float32).reshape(2, 4)
NBYTES = X.nbytes  # 32: one [2, 4] FP32 tensor
LIMIT = 1 << 20  # the gateway's max_message_bytes


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    path = tmp_path_factory.mktemp("shm-tenants") / "tenants.toml"
    for tenant in ("alice", "bob"):
        assert admin(path, "create", tenant, "--models", "*")[0] == 0
    return path, issue(path, "alice"), issue(path, "bob")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory,
            keys: tuple[Path, str, str]) -> Iterator[RunningGateway]:
    store = tmp_path_factory.mktemp("shm-store")
    models.write_model(store, "add", 1, models.add_constant(1.0), models.add_model_config("add"))
    with running_gateway(store, tenants=keys[0], http_port=0,
                         max_message_bytes=LIMIT) as running:
        yield running


@pytest.fixture
def regions(gateway: RunningGateway,
            keys: tuple[Path, str, str]) -> Iterator[dict[str, Any]]:
    """An input region holding X and an output region of twice its size, in /dev/shm;
    afterwards both tenants' registrations are dropped, so a test that fails midway
    leaves none behind for the next one to collide with."""
    tag = f"{os.getpid()}_{uuid.uuid4().hex[:12]}"
    made = {
        "in": shm.create_shared_memory_region("in", f"/mg_test_in_{tag}", NBYTES),
        "out": shm.create_shared_memory_region("out", f"/mg_test_out_{tag}", 2 * NBYTES),
    }
    shm.set_shared_memory_region(made["in"], [X])
    made["in_key"], made["out_key"] = f"/mg_test_in_{tag}", f"/mg_test_out_{tag}"
    yield made
    client = _grpc(gateway)
    for key in keys[1:]:
        client.unregister_system_shared_memory(headers=_bearer(key))
    client.close()
    for name in ("in", "out"):
        shm.destroy_shared_memory_region(made[name])


def _grpc(gateway: RunningGateway) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(gateway.target)


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _counted(gateway: RunningGateway, direction: str) -> float:
    value = gateway.gateway.metrics.registry.get_sample_value(
        "modelgate_shared_memory_bytes_total", {"direction": direction})
    return value or 0.0


def test_grpc_register_infer_status_unregister(
    gateway: RunningGateway, keys: tuple[Path, str, str], regions: dict[str, Any]
) -> None:
    client, headers = _grpc(gateway), _bearer(keys[1])
    client.register_system_shared_memory("in", regions["in_key"], NBYTES, headers=headers)
    client.register_system_shared_memory("out", regions["out_key"], 2 * NBYTES,
                                         headers=headers)
    status = client.get_system_shared_memory_status(headers=headers, as_json=True)
    assert status["regions"]["in"] == {"name": "in", "key": regions["in_key"],
                                       "byte_size": str(NBYTES)}
    before_in, before_out = _counted(gateway, "input"), _counted(gateway, "output")
    inp = grpcclient.InferInput("x", [2, 4], "FP32")
    inp.set_shared_memory("in", NBYTES)
    y = grpcclient.InferRequestedOutput("y")
    y.set_shared_memory("out", NBYTES)
    doubled = grpcclient.InferRequestedOutput("doubled")
    doubled.set_shared_memory("out", NBYTES, offset=NBYTES)
    result = client.infer("add", [inp], outputs=[y, doubled], headers=headers)
    assert list(result.get_output("y").shape) == [2, 4]
    assert result.get_output("y").parameters["shared_memory_region"].string_param == "out"
    np.testing.assert_array_equal(
        shm.get_contents_as_numpy(regions["out"], np.float32, [2, 4]), X + 1)
    np.testing.assert_array_equal(
        shm.get_contents_as_numpy(regions["out"], np.float32, [2, 4], offset=NBYTES), X * 2)
    assert _counted(gateway, "input") - before_in == NBYTES
    assert _counted(gateway, "output") - before_out == 2 * NBYTES
    client.unregister_system_shared_memory("in", headers=headers)
    assert set(client.get_system_shared_memory_status(
        headers=headers, as_json=True)["regions"]) == {"out"}
    with pytest.raises(InferenceServerException) as caught:
        client.infer("add", [inp], headers=headers)
    assert caught.value.status() == "StatusCode.NOT_FOUND"
    assert "no shared memory region 'in' is registered" in caught.value.message()
    client.unregister_system_shared_memory(headers=headers)  # all of them
    assert not client.get_system_shared_memory_status(headers=headers, as_json=True)
    client.close()


def test_grpc_stream_messages_use_shared_memory(
    gateway: RunningGateway, keys: tuple[Path, str, str], regions: dict[str, Any]
) -> None:
    client, headers = _grpc(gateway), _bearer(keys[1])
    client.register_system_shared_memory("in", regions["in_key"], NBYTES, headers=headers)
    client.register_system_shared_memory("out", regions["out_key"], 2 * NBYTES,
                                         headers=headers)
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)),
                        headers=headers)
    inp = grpcclient.InferInput("x", [2, 4], "FP32")
    inp.set_shared_memory("in", NBYTES)
    y = grpcclient.InferRequestedOutput("y")
    y.set_shared_memory("out", NBYTES)
    client.async_stream_infer("add", [inp], outputs=[y], request_id="s-1")
    missing = grpcclient.InferInput("x", [2, 4], "FP32")
    missing.set_shared_memory("nope", NBYTES)
    client.async_stream_infer("add", [missing], request_id="s-2")
    # A stream answers in the order messages complete: s-2 fails before s-1's batch runs
    # as often as not, so the two answers are told apart by what they are.
    got = [answers.get(timeout=30) for _ in range(2)]
    results = [result for result, error in got if error is None]
    errors = [error for result, error in got if result is None]
    assert [result.get_response().id for result in results] == ["s-1"]
    assert len(errors) == 1 and "no shared memory region 'nope'" in str(errors[0])
    np.testing.assert_array_equal(
        shm.get_contents_as_numpy(regions["out"], np.float32, [2, 4]), X + 1)
    client.stop_stream()
    client.unregister_system_shared_memory(headers=headers)
    client.close()


@pytest.mark.parametrize("binary", [True, False], ids=["binary-out", "json-out"])
def test_http_register_infer_status_unregister(
    gateway: RunningGateway, keys: tuple[Path, str, str], regions: dict[str, Any],
    binary: bool,
) -> None:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{gateway.gateway.rest_port}")
    headers = _bearer(keys[1])
    client.register_system_shared_memory("in", regions["in_key"], NBYTES, headers=headers)
    client.register_system_shared_memory("out", regions["out_key"], 2 * NBYTES,
                                         headers=headers)
    assert client.get_system_shared_memory_status("in", headers=headers) == [
        {"name": "in", "key": regions["in_key"], "offset": 0, "byte_size": NBYTES}]
    inp = httpclient.InferInput("x", [2, 4], "FP32")
    inp.set_shared_memory("in", NBYTES)
    y = httpclient.InferRequestedOutput("y", binary_data=binary)
    y.set_shared_memory("out", NBYTES, offset=NBYTES)
    plain = httpclient.InferRequestedOutput("doubled", binary_data=binary)
    for _ in range(2):
        result = client.infer("add", [inp], outputs=[y, plain], headers=headers)
        assert result.get_output("y")["parameters"] == {
            "shared_memory_region": "out", "shared_memory_byte_size": NBYTES,
            "shared_memory_offset": NBYTES}
        np.testing.assert_array_equal(result.as_numpy("doubled"), X * 2)
        np.testing.assert_array_equal(
            shm.get_contents_as_numpy(regions["out"], np.float32, [2, 4], offset=NBYTES), X + 1)
    client.unregister_system_shared_memory(headers=headers)
    assert client.get_system_shared_memory_status(headers=headers) == []
    client.close()


def test_offsets_and_sizes_are_checked_against_the_region(
    gateway: RunningGateway, keys: tuple[Path, str, str], regions: dict[str, Any]
) -> None:
    client, headers = _grpc(gateway), _bearer(keys[1])
    client.register_system_shared_memory("in", regions["in_key"], NBYTES, headers=headers)
    client.register_system_shared_memory("out", regions["out_key"], NBYTES, headers=headers)
    cases = [("in", NBYTES, NBYTES, "lie outside"),        # offset past the region
             ("in", 2 * NBYTES, 0, "lie outside"),         # size larger than the region
             ("in", NBYTES - 4, 0, "needs 32 bytes")]      # a size the shape does not fill
    for region, size, offset, message in cases:
        inp = grpcclient.InferInput("x", [2, 4], "FP32")
        inp.set_shared_memory(region, size, offset=offset)
        with pytest.raises(InferenceServerException) as caught:
            client.infer("add", [inp], headers=headers)
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT", caught.value
        assert message in caught.value.message()
    inp = grpcclient.InferInput("x", [2, 4], "FP32")
    inp.set_shared_memory("in", NBYTES)
    small = grpcclient.InferRequestedOutput("y")
    small.set_shared_memory("out", NBYTES - 4)  # the output needs 32 bytes
    past = grpcclient.InferRequestedOutput("doubled")
    past.set_shared_memory("out", NBYTES, offset=4)
    for output, message in ((small, "the output needs 32 bytes"), (past, "lie outside")):
        with pytest.raises(InferenceServerException) as caught:
            client.infer("add", [inp], outputs=[output], headers=headers)
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert message in caught.value.message()
    # Registering past the end of the object itself.
    with pytest.raises(InferenceServerException) as caught:
        client.register_system_shared_memory("far", regions["in_key"], NBYTES, offset=8,
                                             headers=headers)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "runs past the end" in caught.value.message()
    client.unregister_system_shared_memory(headers=headers)
    client.close()


def test_regions_are_the_registering_tenants_alone(
    gateway: RunningGateway, keys: tuple[Path, str, str], regions: dict[str, Any]
) -> None:
    client = _grpc(gateway)
    alice, bob = _bearer(keys[1]), _bearer(keys[2])
    client.register_system_shared_memory("in", regions["in_key"], NBYTES, headers=alice)
    assert not client.get_system_shared_memory_status(headers=bob, as_json=True)
    inp = grpcclient.InferInput("x", [2, 4], "FP32")
    inp.set_shared_memory("in", NBYTES)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("add", [inp], headers=bob)
    assert caught.value.status() == "StatusCode.NOT_FOUND"
    # Nor may bob register alice's object under a name of his own.
    for key in (regions["in_key"], regions["in_key"].lstrip("/")):  # one object, two spellings
        with pytest.raises(InferenceServerException) as caught:
            client.register_system_shared_memory("mine", key, NBYTES, headers=bob)
        assert caught.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as caught:
        client.get_system_shared_memory_status("in", headers=bob)
    assert caught.value.status() == "StatusCode.NOT_FOUND"
    client.unregister_system_shared_memory("in", headers=bob)  # not his: nothing happens
    assert client.infer("add", [inp], headers=alice).as_numpy("y").tolist() == (X + 1).tolist()
    client.unregister_system_shared_memory(headers=alice)
    client.close()


@pytest.mark.parametrize("key", [
    "../etc/passwd", "/../../etc/passwd", "/a/b", "/dev/shm/x", "", "/", "..", "/.hidden",
    "/modelgate-quota-anything", "x" * 300,
])
def test_keys_cannot_leave_dev_shm_or_reach_the_gateways_own(
    gateway: RunningGateway, keys: tuple[Path, str, str], key: str
) -> None:
    answer = rest(gateway.gateway.rest_port, "POST",
                  "/v2/systemsharedmemory/region/r/register",
                  {"key": key, "offset": 0, "byte_size": 4}, _bearer(keys[1]))
    assert answer.status in (400, 404), answer.body
    assert "shared memory" in answer.json()["error"]


def test_inputs_in_shared_memory_are_bounded_like_a_message(
    gateway: RunningGateway, keys: tuple[Path, str, str]
) -> None:
    # Three inputs of half the limit each, all in one region: refused before any is read
    # (a request naming a region many times must not make the server hold many copies).
    half = LIMIT // 2
    region = shm.create_shared_memory_region("big", f"/mg_test_big_{os.getpid()}", half)
    client, headers = _grpc(gateway), _bearer(keys[1])
    try:
        client.register_system_shared_memory("big", f"/mg_test_big_{os.getpid()}", half,
                                             headers=headers)
        before = _counted(gateway, "input")
        request = pb.ModelInferRequest(model_name="add")
        for index in range(3):
            tensor = request.inputs.add(name=f"x{index}", datatype="FP32",
                                        shape=[half // 16, 4])
            tensor.parameters["shared_memory_region"].string_param = "big"
            tensor.parameters["shared_memory_byte_size"].int64_param = half
        with grpc.insecure_channel(gateway.target) as channel, pytest.raises(
            grpc.RpcError
        ) as caught:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                request, metadata=tuple(headers.items()), timeout=30)
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "more than max_message_bytes" in (caught.value.details() or "")
        assert _counted(gateway, "input") == before
        body = {"inputs": [{"name": f"x{index}", "shape": [half // 16, 4], "datatype": "FP32",
                            "parameters": {"shared_memory_region": "big",
                                           "shared_memory_byte_size": half}}
                           for index in range(3)]}
        answer = rest(gateway.gateway.rest_port, "POST", "/v2/models/add/infer", body, headers)
        assert answer.status == 413 and "more than max_message_bytes" in answer.json()["error"]
        client.unregister_system_shared_memory(headers=headers)
    finally:
        client.close()
        shm.destroy_shared_memory_region(region)


def test_an_object_shrunk_after_registering_is_refused_not_fatal(
    gateway: RunningGateway, keys: tuple[Path, str, str]
) -> None:
    key = f"/mg_test_shrink_{os.getpid()}"
    region = shm.create_shared_memory_region("shrink", key, NBYTES)
    shm.set_shared_memory_region(region, [X])
    client, headers = _grpc(gateway), _bearer(keys[1])
    try:
        client.register_system_shared_memory("shrink", key, NBYTES, headers=headers)
        os.truncate(f"/dev/shm{key}", 8)  # a mapping would now fault past the 8 bytes
        inp = grpcclient.InferInput("x", [2, 4], "FP32")
        inp.set_shared_memory("shrink", NBYTES)
        with pytest.raises(InferenceServerException) as caught:
            client.infer("add", [inp], headers=headers)
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "holds 8 of the 32 bytes" in caught.value.message()
        assert client.is_server_live(headers=headers)
        client.unregister_system_shared_memory(headers=headers)
    finally:
        client.close()
        shm.destroy_shared_memory_region(region)


def test_a_symlink_in_dev_shm_is_not_followed(
    gateway: RunningGateway, keys: tuple[Path, str, str], tmp_path: Path
) -> None:
    target = tmp_path / "secret"
    target.write_bytes(b"s" * 64)
    link = Path(f"/dev/shm/mg_test_link_{os.getpid()}")
    link.symlink_to(target)
    try:
        client = _grpc(gateway)
        with pytest.raises(InferenceServerException) as caught:
            client.register_system_shared_memory("r", f"/{link.name}", 8,
                                                 headers=_bearer(keys[1]))
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
        client.close()
    finally:
        link.unlink()


def test_a_tenants_regions_are_bounded(
    gateway: RunningGateway, keys: tuple[Path, str, str], regions: dict[str, Any]
) -> None:
    client, headers = _grpc(gateway), _bearer(keys[2])
    for index in range(MAX_REGIONS):
        client.register_system_shared_memory(f"r{index}", regions["in_key"], NBYTES,
                                             headers=headers)
    with pytest.raises(InferenceServerException) as caught:
        client.register_system_shared_memory("one-more", regions["in_key"], NBYTES,
                                             headers=headers)
    assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    with pytest.raises(InferenceServerException) as caught:
        client.register_system_shared_memory("r0", regions["in_key"], NBYTES, headers=headers)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"  # the name is taken
    client.unregister_system_shared_memory(headers=headers)
    client.close()


def test_cuda_shared_memory_is_unimplemented_naming_it(
    gateway: RunningGateway, keys: tuple[Path, str, str]
) -> None:
    client = _grpc(gateway)
    with pytest.raises(InferenceServerException) as caught:
        client.get_cuda_shared_memory_status(headers=_bearer(keys[1]))
    assert caught.value.status() == "StatusCode.UNIMPLEMENTED"
    assert "cuda_shared_memory" in caught.value.message()
    client.close()
    answer = rest(gateway.gateway.rest_port, "GET", "/v2/cudasharedmemory/status",
                  headers=_bearer(keys[1]))
    assert answer.status == 501 and "cuda_shared_memory" in answer.json()["error"]
    meta = rest(gateway.gateway.rest_port, "GET", "/v2", headers=_bearer(keys[1])).json()
    assert "system_shared_memory" in meta["extensions"]
    assert "cuda_shared_memory" not in meta["extensions"]
