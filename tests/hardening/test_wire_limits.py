"""Sizes and strings at the edge, against the real ``modelgate serve`` process: compressed
requests (gzip and deflate answered; a bomb refused without being inflated past the limit,
and why gRPC core's own decompression is off), shapes that overflow, tensor counts and
names, paths in error messages, and request fields in log lines."""

from __future__ import annotations

import re
import shutil
import subprocess
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc

from gateway.wire.conversion import MAX_ELEMENTS, MAX_TENSORS
from loadtests import h2load
from loadtests.noop_server import start_noop
from loadtests.probes import peak_rss_kib
from loadtests.servers import free_port
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc
from tests.support import models
from tests.support.gateway import GatewayProcess

pytestmark = pytest.mark.timeout(240)

RECEIVE_LIMIT = 1 << 20


@pytest.fixture(scope="module")
def store(hardening_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wire-store")
    for name in ("add", "batched"):
        shutil.copytree(hardening_store / name, root / name)
    models.write_model(root, "broken", 1, b"not an onnx file", models.add_model_config("broken"))
    shutil.copytree(hardening_store / "any_shape", root / "any_shape")
    return root


@pytest.fixture(scope="module")
def process(
    store: Path, tenant_keys: tuple[Path, str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, Path]]:
    access = tmp_path_factory.mktemp("access") / "access.jsonl"
    with GatewayProcess(["--store", str(store), "--tenants", str(tenant_keys[0]),
                         "--enable-model-control", "--access-log", str(access),
                         "--max-message-bytes", str(RECEIVE_LIMIT)]) as proc:
        yield proc, access


def key(tenant_keys: tuple[Path, str, str], admin: bool = False) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {tenant_keys[2] if admin else tenant_keys[1]}"),)


def add_request(rows: int = 1) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="add")
    request.inputs.add(name="x", datatype="FP32", shape=[rows, 4])
    request.raw_input_contents.append(b"\0" * (16 * rows))
    return request


def gzip_bomb(inflated: int) -> bytes:
    """One compressed gRPC frame (flag 1) holding a ModelInferRequest for ``add`` whose
    raw input is ``inflated`` zero bytes: about a thousandth of that on the wire, and
    built without ever holding the inflated message."""
    head = add_request()
    del head.raw_input_contents[:]
    length, varint = inflated, bytearray()
    while True:  # field 7 (raw_input_contents), length-delimited, then the bytes
        varint.append((length & 0x7F) | (0x80 if length > 0x7F else 0))
        length >>= 7
        if not length:
            break
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip stream
    parts = [packer.compress(head.SerializeToString() + b"\x3a" + bytes(varint))]
    zeros = bytes(1 << 20)
    for _ in range(inflated >> 20):
        parts.append(packer.compress(zeros))
    parts.append(packer.flush())
    compressed = b"".join(parts)
    return b"\x01" + len(compressed).to_bytes(4, "big") + compressed


def post_frame(target: str, frame: bytes, tmp_path: Path,
               headers: tuple[str, ...] = ()) -> tuple[int, str]:
    """POST one gRPC frame to ModelInfer as gzip-encoded with h2load (which sends bytes as
    they are), with ``headers`` ("name: value") too; returns the grpc-status and
    grpc-message trailers."""
    body = tmp_path / "frame.bin"
    body.write_bytes(frame)
    binary = h2load.binary()
    assert binary is not None, "h2load missing: run scripts/install_test_deps.sh"
    done = subprocess.run(
        [binary, "-n", "1", "-c", "1", "-v", "-d", str(body), "-H", "grpc-encoding: gzip",
         *(arg for header in (*h2load.GRPC_HEADERS, *headers) for arg in ("-H", header)),
         f"http://{target}{h2load.PATH}"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    trailers = dict(re.findall(r"\] (grpc-status|grpc-message): (.*)", done.stdout))
    return int(trailers["grpc-status"]), trailers.get("grpc-message", "")


def test_grpcio_inflates_a_compressed_message_whole_before_checking_its_size(
    tmp_path: Path,
) -> None:
    # Why the gateway turns gRPC core's per-message decompression off and inflates itself,
    # kept true on every grpcio upgrade: a plain grpc.aio server (gzip enabled, as by
    # default; 4 MiB receive limit) inflates a 128 MiB bomb of 128 KiB completely and only
    # then compares it with the limit. Should grpcio start to bound the inflated size, this
    # fails: then core's decompression could be used again.
    frame = gzip_bomb(128 << 20)
    assert len(frame) < 256 << 10
    with start_noop(free_port(), b"") as noop:
        before = peak_rss_kib(noop.pid)
        status, message = post_frame(noop.target, frame, tmp_path)
        growth = peak_rss_kib(noop.pid) - before
    assert status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message
    measured = re.search(r"larger than max \((\d+) vs\. \d+\)", message)
    assert measured is not None, message
    assert int(measured.group(1)) > 128 << 20  # the size it measured is the inflated one
    assert growth > 100 << 10, growth  # and it held all of it at once


def test_a_gzip_bomb_is_refused_without_being_inflated_past_the_limit(
    process: tuple[GatewayProcess, Path], tenant_keys: tuple[Path, str, str], tmp_path: Path
) -> None:
    proc, _ = process
    before = peak_rss_kib(proc.proc.pid)
    # 256 MiB inflated, 256 KiB on the wire: under the 1 MiB receive limit as sent.
    status, message = post_frame(proc.target, gzip_bomb(256 << 20), tmp_path,
                                 (f"authorization: Bearer {tenant_keys[1]}",))
    assert status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message
    assert message == (f"the compressed request inflates past max_message_bytes "
                       f"({RECEIVE_LIMIT} bytes)")
    # grpcio would have held all 256 MiB (the test above); the gateway stops at the limit.
    assert peak_rss_kib(proc.proc.pid) - before < 32 << 10
    bomb = add_request()
    bomb.raw_input_contents[0] = b"\0" * (8 << 20)  # 8 MiB of zeros: ~8 KiB compressed
    for compression in (grpc.Compression.Gzip, grpc.Compression.Deflate):
        with (grpc.insecure_channel(proc.target, compression=compression) as channel,
              pytest.raises(grpc.RpcError) as caught):
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                bomb, metadata=key(tenant_keys), timeout=60
            )
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "inflates past max_message_bytes" in (caught.value.details() or "")
        # In a stream the bomb is answered in-stream, and the stream goes on.
        with grpc.insecure_channel(proc.target, compression=compression) as channel:
            answers = list(pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
                iter([bomb, add_request()]), metadata=key(tenant_keys), timeout=60))
        assert "inflates past max_message_bytes" in answers[0].error_message
        assert not answers[1].error_message and answers[1].infer_response.outputs
    assert peak_rss_kib(proc.proc.pid) - before < 32 << 10
    with grpc.insecure_channel(proc.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ModelInfer(add_request(), metadata=key(tenant_keys), timeout=10).outputs
        oversized = add_request()
        oversized.raw_input_contents[0] = b"\0" * (2 * RECEIVE_LIMIT)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(oversized, metadata=key(tenant_keys), timeout=30)
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_broken_compressed_message_is_invalid_argument(
    process: tuple[GatewayProcess, Path], tenant_keys: tuple[Path, str, str], tmp_path: Path
) -> None:
    frame = gzip_bomb(1 << 20)
    truncated = frame[:5 + 100]
    truncated = b"\x01" + (len(truncated) - 5).to_bytes(4, "big") + truncated[5:]
    status, message = post_frame(process[0].target, truncated, tmp_path,
                                 (f"authorization: Bearer {tenant_keys[1]}",))
    assert status == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert message == "the compressed request is truncated or has trailing bytes"


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclient_compression_is_answered(
    process: tuple[GatewayProcess, Path], tenant_keys: tuple[Path, str, str], algorithm: str
) -> None:
    client = tc.InferenceServerClient(process[0].target)
    try:
        tensor = tc.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
        headers = {"authorization": f"Bearer {tenant_keys[1]}"}
        answer = client.infer("add", [tensor], headers=headers, compression_algorithm=algorithm)
        assert answer.as_numpy("y").tolist() == [[2.0] * 4]
        # Every RPC, not only inference: metadata asked compressed is answered too.
        assert client.get_model_metadata("add", headers=headers).name == "add"
    finally:
        client.close()


@pytest.mark.parametrize("shape", [
    [2**62, 4], [1, 2**40, 2**40], [0, 2**62], [1, -4], [-1, 4], [1] * 17,
    [MAX_ELEMENTS + 1, 1], [2**63 - 1, 2**63 - 1],
])
def test_shapes_that_overflow_or_lie_are_invalid_argument(
    process: tuple[GatewayProcess, Path], tenant_keys: tuple[Path, str, str], shape: list[int]
) -> None:
    request = pb.ModelInferRequest(model_name="add")
    request.inputs.add(name="x", datatype="FP32", shape=shape)
    request.raw_input_contents.append(b"\0" * 16)
    with (grpc.insecure_channel(process[0].target) as channel,
          pytest.raises(grpc.RpcError) as caught):
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=key(tenant_keys), timeout=10
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'x'" in (caught.value.details() or "")


@pytest.mark.parametrize("shape", [[2**40, 2**40], [0, 2**62], [MAX_ELEMENTS + 1, 1],
                                   [2**31, 0]])
def test_the_element_count_is_capped_where_the_model_allows_any_shape(
    process: tuple[GatewayProcess, Path], tenant_keys: tuple[Path, str, str], shape: list[int]
) -> None:
    request = pb.ModelInferRequest(model_name="any_shape")
    request.inputs.add(name="a", datatype="FP32", shape=shape)
    request.raw_input_contents.append(b"")
    with (grpc.insecure_channel(process[0].target) as channel,
          pytest.raises(grpc.RpcError) as caught):
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=key(tenant_keys), timeout=10
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert f"exceeds {MAX_ELEMENTS} elements" in (caught.value.details() or "")


def test_an_empty_tensor_of_any_shape_is_answered(
    process: tuple[GatewayProcess, Path], tenant_keys: tuple[Path, str, str]
) -> None:
    request = pb.ModelInferRequest(model_name="any_shape")
    request.inputs.add(name="a", datatype="FP32", shape=[0, 7])
    request.raw_input_contents.append(b"")
    with grpc.insecure_channel(process[0].target) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=key(tenant_keys), timeout=10
        )
    assert list(response.outputs[0].shape) == [0, 7]


def test_tensor_counts_and_names_are_capped_and_deduplicated(
    process: tuple[GatewayProcess, Path], tenant_keys: tuple[Path, str, str]
) -> None:
    too_many = add_request()
    for index in range(MAX_TENSORS):
        too_many.outputs.add(name=f"o{index}")
    duplicate_output = add_request()
    duplicate_output.outputs.add(name="y")
    duplicate_output.outputs.add(name="y")
    control_name = pb.ModelInferRequest(model_name="add")
    control_name.inputs.add(name="x\r\nFORGED", datatype="FP32", shape=[1, 4])
    control_name.raw_input_contents.append(b"\0" * 16)
    duplicate_input = add_request()
    duplicate_input.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    duplicate_input.raw_input_contents.append(b"\0" * 16)
    with grpc.insecure_channel(process[0].target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for request in (too_many, duplicate_output, control_name, duplicate_input):
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(request, metadata=key(tenant_keys), timeout=10)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            details = caught.value.details() or ""
            assert "\n" not in details and "\r" not in details


def test_clients_never_see_the_store_path(
    process: tuple[GatewayProcess, Path], store: Path, tenant_keys: tuple[Path, str, str]
) -> None:
    seen: list[str] = []
    with grpc.insecure_channel(process[0].target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=key(tenant_keys))
        seen += [m.reason for m in index.models if m.name == "broken"]
        request = add_request()
        request.model_name = "broken"
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, metadata=key(tenant_keys), timeout=10)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        seen.append(caught.value.details() or "")
        _, ready = stub.ModelReady.with_call(pb.ModelReadyRequest(name="broken"),
                                             metadata=key(tenant_keys))
        seen += [value for name, value in ready.trailing_metadata() or ()
                 if name == "modelgate-reason"]
        with pytest.raises(grpc.RpcError) as caught:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="broken"),
                                     metadata=key(tenant_keys, admin=True), timeout=60)
        seen.append(caught.value.details() or "")
    assert len(seen) == 4 and all("model.onnx" in text for text in seen[:1]), seen
    for text in seen:
        assert str(store) not in text and "/tmp" not in text, text
        assert "Traceback" not in text
    assert str(store) in process[0].log()  # the operator's log keeps the whole path


def test_request_fields_never_forge_a_log_line(
    process: tuple[GatewayProcess, Path], tenant_keys: tuple[Path, str, str]
) -> None:
    proc, access = process
    forged = "zz\r\n2026-11-23 18:00:00,000 INFO FORGED\u2028FORGED\x1b[31m"
    with grpc.insecure_channel(proc.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        calls: tuple[Callable[[], object], ...] = (
            lambda: stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=forged),
                                             metadata=key(tenant_keys, admin=True)),
            lambda: stub.ModelInfer(pb.ModelInferRequest(model_name=forged, id=forged),
                                    metadata=key(tenant_keys)),
            lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name=forged, version=forged),
                                       metadata=key(tenant_keys)),
        )
        for call in calls:
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() in (grpc.StatusCode.NOT_FOUND,
                                           grpc.StatusCode.INVALID_ARGUMENT)
    proc.stop()
    log = proc.log()
    assert "RepositoryModelLoad" in log  # the admin's call is logged, escaped
    for text in (log, access.read_text(encoding="utf-8")):
        for line in text.splitlines():
            assert "FORGED" not in line.split(":", 1)[0], line
            assert not line.startswith(("2026-11-23 18:00:00", "FORGED", "\x1b"))
            assert "\x1b" not in line and "\u2028" not in line and "\r" not in line
