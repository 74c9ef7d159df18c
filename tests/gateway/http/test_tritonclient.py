"""tritonclient.http, unchanged, against the REST port: metadata, JSON and binary inference,
every datatype (BYTES included), model_version, compression both ways, and its errors."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.support.gateway import RunningGateway

pytestmark = pytest.mark.timeout(180)

# numpy dtype of each V2 datatype the all_types model serves.
DTYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
    "BYTES": np.object_,
}


@pytest.fixture(scope="module")
def client(open_gateway: RunningGateway) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(f"127.0.0.1:{open_gateway.gateway.rest_port}")
    yield c
    c.close()


def sample(datatype: str, rows: int = 2) -> np.ndarray:
    if datatype == "BYTES":
        return np.array([[f"r{r}c{c}é".encode() for c in range(3)] for r in range(rows)],
                        dtype=np.object_)
    if datatype == "BOOL":
        return np.array([[True, False, True]] * rows)
    return (np.arange(rows * 3) + 1).reshape(rows, 3).astype(DTYPES[datatype])


def test_health_and_server_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "modelgate"
    assert "binary_tensor_data" in meta["extensions"]


def test_model_metadata_config_and_readiness(client: httpclient.InferenceServerClient) -> None:
    meta = client.get_model_metadata("add")
    assert meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert {o["name"] for o in meta["outputs"]} == {"y", "doubled"}
    assert client.get_model_metadata("add", model_version="1")["name"] == "add"
    config = client.get_model_config("add")
    assert config["name"] == "add" and config["max_batch_size"] == 8
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert client.is_model_ready("add") and client.is_model_ready("add", "1")
    assert not client.is_model_ready("no_such_model")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_runs_the_version_asked_for(
    client: httpclient.InferenceServerClient, binary: bool
) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    inp = httpclient.InferInput("x", [2, 4], "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = [httpclient.InferRequestedOutput("y", binary_data=binary)]
    latest = client.infer("add", [inp], outputs=out, request_id="r-7")
    np.testing.assert_array_equal(latest.as_numpy("y"), x + 10)
    assert latest.get_response()["model_version"] == "2"
    assert latest.get_response()["id"] == "r-7"
    assert latest.as_numpy("doubled") is None  # only what was asked for
    first = client.infer("add", [inp], outputs=out, model_version="1")
    np.testing.assert_array_equal(first.as_numpy("y"), x + 1)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_datatype_round_trips(
    client: httpclient.InferenceServerClient, binary: bool
) -> None:
    inputs, outputs = [], []
    for datatype in DTYPES:
        inp = httpclient.InferInput(f"in_{datatype}", [2, 3], datatype)
        inp.set_data_from_numpy(sample(datatype), binary_data=binary)
        inputs.append(inp)
        outputs.append(httpclient.InferRequestedOutput(f"out_{datatype}", binary_data=binary))
    result = client.infer("all_types", inputs, outputs=outputs)
    for datatype, dtype in DTYPES.items():
        got = result.as_numpy(f"out_{datatype}")
        if datatype == "BYTES":
            # JSON BYTES come back as text; binary ones as bytes.
            assert [[e if isinstance(e, bytes) else e.encode() for e in row] for row in got] \
                == sample(datatype).tolist()
        else:
            np.testing.assert_array_equal(got, sample(datatype))
            assert got.dtype == np.dtype(dtype)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_and_answers(
    client: httpclient.InferenceServerClient, algorithm: str
) -> None:
    x = np.ones((8, 4), dtype=np.float32)
    inp = httpclient.InferInput("x", [8, 4], "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("add", [inp], model_version="1",
                          request_compression_algorithm=algorithm,
                          response_compression_algorithm=algorithm)
    np.testing.assert_array_equal(result.as_numpy("doubled"), x * 2)


def test_statistics_count_rest_requests(client: httpclient.InferenceServerClient) -> None:
    def count() -> int:
        stats = client.get_inference_statistics("batched")["model_stats"]
        return int(stats[0]["inference_count"]) if stats else 0

    before = count()
    inp = httpclient.InferInput("x", [3, 4], "FP32")
    inp.set_data_from_numpy(np.zeros((3, 4), dtype=np.float32))
    client.infer("batched", [inp])
    assert count() == before + 3  # rows, as Triton counts them
    stats = client.get_inference_statistics("batched")["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] >= 1


def test_repository_index_lists_every_version(client: httpclient.InferenceServerClient) -> None:
    index = client.get_model_repository_index()
    assert {(e["name"], e["version"]) for e in index} >= {("add", "1"), ("add", "2"),
                                                          ("batched", "1")}
    assert all(e["state"] == "READY" for e in index)


def test_errors_come_back_as_tritonclient_exceptions(
    client: httpclient.InferenceServerClient,
) -> None:
    inp = httpclient.InferInput("x", [1, 5], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 5), dtype=np.float32))
    with pytest.raises(InferenceServerException) as bad:
        client.infer("add", [inp])
    assert bad.value.status() == "400" and "x" in bad.value.message()
    with pytest.raises(InferenceServerException) as missing:
        client.infer("no_such_model", [inp])
    assert missing.value.status() == "404"
    assert "unknown model 'no_such_model'" in missing.value.message()
    with pytest.raises(InferenceServerException) as version:
        client.get_model_metadata("add", model_version="9")
    assert version.value.status() == "404"
    # Model control is off on this gateway: refused whoever asks.
    with pytest.raises(InferenceServerException) as control:
        client.load_model("add")
    assert control.value.status() == "400" and "model control is off" in control.value.message()
