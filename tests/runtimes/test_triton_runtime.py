"""The Triton runtime against a real tritonserver (Python-backend models running ONNX files)
and, for what Triton does not show, a recording upstream: results equal direct calls for every
datatype, upstream statuses come back as sent, deadline and trace context go upstream, and a
request that never reached an upstream is retried once elsewhere."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from model_store.config import parse_config_text, spec_from_config
from model_store.datatypes import DataType
from model_store.spec import ModelId, ModelSpec
from runtimes.base import InferRequest, Tensor
from runtimes.errors import ModelLoadError, UpstreamError
from runtimes.triton_runtime import TritonRoute, TritonRuntime
from runtimes.triton_wire import raw_bytes
from runtimes.upstreams import UpstreamConfig, UpstreamPool, parse_upstream
from tests.support.certs import CertificateAuthority
from tests.support.gateway import free_port
from tests.support.models import ONNX_TYPES, add_model_config, all_types_config
from tests.support.recording_upstream import recording_upstream
from tests.support.triton_server import TritonServer, triton_servers

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture(scope="module")
def triton() -> Iterator[TritonServer]:
    with triton_servers(1, ("all_types", "add", "add_slow")) as (server,):
        yield server


def sample(datatype: str, rows: int = 2, width: int = 3) -> Tensor:
    """Distinct values of every datatype, including ones that need all their bits."""
    count = rows * width
    if datatype == "BYTES":
        values = [f"é{i}".encode() * i for i in range(count)]
        array = np.empty(count, dtype=object)
        array[:] = values
        return array.reshape(rows, width)
    if datatype == "BOOL":
        return np.asarray(np.arange(count) % 2 == 0).reshape(rows, width)
    dtype = DataType(datatype).numpy_dtype
    if dtype.kind == "f":
        return (np.arange(count) * 1.5 - 2.25).astype(dtype).reshape(rows, width)
    info = np.iinfo(dtype)  # type: ignore[type-var]
    edges = [int(info.min), int(info.max), 0, 1, int(info.max) // 3, int(info.min) // 7 or 2]
    return np.resize(np.array(edges, dtype=dtype), count).reshape(rows, width)


def spec_of(config: str, name: str) -> ModelSpec:
    return spec_from_config(parse_config_text(config, name))


@pytest.fixture
async def pool(triton: TritonServer) -> AsyncIterator[UpstreamPool]:
    pool = UpstreamPool([UpstreamConfig("t", "127.0.0.1", triton.port)], probe_interval_s=3600)
    await pool.start()
    try:
        yield pool
    finally:
        await pool.close()


async def loaded(pool: UpstreamPool, spec: ModelSpec, remote: str, version: str = "1",
                 upstreams: tuple[str, ...] = ("t",)) -> TritonRuntime:
    runtime = TritonRuntime(ModelId(spec.name, 1), spec,
                            TritonRoute(upstreams, remote, version), pool)
    await runtime.load()
    return runtime


async def test_every_datatype_equals_direct_triton(pool: UpstreamPool,
                                                   triton: TritonServer) -> None:
    runtime = await loaded(pool, spec_of(all_types_config("gw_all"), "gw_all"), "all_types")
    assert runtime.ready()
    inputs = {f"in_{t}": sample(t) for t in ONNX_TYPES}
    ours = await runtime.infer(InferRequest(inputs=inputs, rows=2))

    client = tc.InferenceServerClient(triton.target)
    direct_inputs = []
    for name, array in inputs.items():
        tensor = tc.InferInput(name, list(array.shape), name.removeprefix("in_"))
        tensor.set_data_from_numpy(array)
        direct_inputs.append(tensor)
    direct = client.infer("all_types", direct_inputs)
    for datatype in ONNX_TYPES:
        name = f"out_{datatype}"
        assert ours[name].dtype == direct.as_numpy(name).dtype, datatype
        np.testing.assert_array_equal(ours[name], direct.as_numpy(name), err_msg=datatype)
        np.testing.assert_array_equal(ours[name], inputs[f"in_{datatype}"], err_msg=datatype)
    await runtime.unload()


async def test_requested_outputs_only(pool: UpstreamPool) -> None:
    runtime = await loaded(pool, spec_of(add_model_config("gw_add"), "gw_add"), "add")
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    out = await runtime.infer(InferRequest(inputs={"x": x}, outputs=("doubled",), rows=2))
    assert list(out) == ["doubled"]
    np.testing.assert_array_equal(out["doubled"], x * 2)


async def test_upstream_not_found_stays_not_found(pool: UpstreamPool) -> None:
    runtime = await loaded(pool, spec_of(add_model_config("gw_add"), "gw_add"), "no_such_model")
    assert not runtime.ready()
    with pytest.raises(UpstreamError) as caught:
        await runtime.infer(InferRequest(inputs={"x": np.zeros((1, 4), np.float32)}))
    assert caught.value.code == "NOT_FOUND"
    assert "no_such_model" in str(caught.value)


async def test_deadline_exceeded_upstream_comes_back(pool: UpstreamPool) -> None:
    import time

    runtime = await loaded(pool, spec_of(add_model_config("gw_slow"), "gw_slow"), "add_slow")
    request = InferRequest(inputs={"x": np.zeros((1, 4), np.float32)},
                           deadline=time.monotonic() + 0.05)
    with pytest.raises(UpstreamError) as caught:
        await runtime.infer(request)
    assert caught.value.code == "DEADLINE_EXCEEDED"


async def test_upstream_timeout_caps_requests_without_deadline(triton: TritonServer) -> None:
    pool = UpstreamPool([parse_upstream(f"t=127.0.0.1:{triton.port},timeout_s=0.05")])
    await pool.start()
    try:
        runtime = await loaded(pool, spec_of(add_model_config("gw_slow"), "gw_slow"),
                               "add_slow")
        with pytest.raises(UpstreamError) as caught:
            await runtime.infer(InferRequest(inputs={"x": np.zeros((1, 4), np.float32)}))
        assert caught.value.code == "DEADLINE_EXCEEDED"
    finally:
        await pool.close()


async def test_load_rejects_an_undeclared_upstream(pool: UpstreamPool) -> None:
    with pytest.raises(ModelLoadError, match="not declared"):
        await loaded(pool, spec_of(add_model_config("gw_add"), "gw_add"), "add",
                     upstreams=("elsewhere",))


async def test_load_rejects_a_config_that_differs_from_the_upstream(pool: UpstreamPool) -> None:
    config = add_model_config("gw_add").replace("TYPE_FP32", "TYPE_INT32", 1)
    with pytest.raises(ModelLoadError, match="upstream t says FP32"):
        await loaded(pool, spec_of(config, "gw_add"), "add")


async def test_connection_failure_is_retried_once_elsewhere(triton: TritonServer) -> None:
    # "dead" crashed after the last probe: the pool still thinks it is up and ready.
    configs = [UpstreamConfig("dead", "127.0.0.1", free_port()),
               UpstreamConfig("t", "127.0.0.1", triton.port)]
    pool = UpstreamPool(configs, probe_interval_s=3600)
    await pool.start()
    try:
        spec = spec_of(add_model_config("gw_add"), "gw_add")
        runtime = await loaded(pool, spec, "add", upstreams=("dead", "t"))
        dead = pool.upstreams["dead"]
        dead.healthy = True
        dead.ready_models = {("add", "1")}
        pool.upstreams["t"].outstanding = 1  # so "dead" is picked first
        x = np.ones((1, 4), np.float32)
        out = await runtime.infer(InferRequest(inputs={"x": x}))
        np.testing.assert_array_equal(out["y"], x + 1)
        assert not dead.healthy  # taken out by the failure
        assert pool.upstreams["t"].completed == 1

        # With nowhere else to go, the failure comes back as UNAVAILABLE.
        alone = await loaded(pool, spec, "add", upstreams=("dead",))
        dead.healthy = True
        with pytest.raises(UpstreamError) as caught:
            await alone.infer(InferRequest(inputs={"x": x}))
        assert caught.value.code == "UNAVAILABLE"
    finally:
        await pool.close()


async def test_deadline_and_caller_trace_context_arrive_upstream() -> None:
    import time

    async with recording_upstream() as recorder:
        pool = UpstreamPool([UpstreamConfig("rec", "127.0.0.1", recorder.port)])
        await pool.start()
        try:
            spec = spec_of(add_model_config("gw_add"), "gw_add")
            runtime = await loaded(pool, spec, "add", upstreams=("rec",))
            x = np.ones((1, 4), np.float32)
            request = InferRequest(
                inputs={"x": x}, outputs=("y",), deadline=time.monotonic() + 5,
                trace_headers={"traceparent": TRACEPARENT, "tracestate": "k=v"},
            )
            out = await runtime.infer(request)
            np.testing.assert_array_equal(out["y"], x)  # the recorder echoes
            got = recorder.received[-1]
            # The deadline went up (gRPC rounds it to its wire units, hence the slack).
            assert got.time_remaining is not None and 0 < got.time_remaining <= 5.5
            assert got.metadata["traceparent"] == TRACEPARENT
            assert got.metadata["tracestate"] == "k=v"
            # The client's raw bytes went up as they were.
            assert got.request.raw_input_contents[0] == x.tobytes()

            # With the gateway tracing, the upstream's parent is the gateway's current span.
            tracer = TracerProvider().get_tracer("test")
            span = tracer.start_span("batch")
            with trace.use_span(span, end_on_exit=True):
                await runtime.infer(InferRequest(inputs={"x": x}, outputs=("y",),
                                                 trace_headers=request.trace_headers))
            context = span.get_span_context()
            sent = recorder.received[-1].metadata["traceparent"]
            assert sent.startswith(f"00-{context.trace_id:032x}-{context.span_id:016x}-")
            assert "grpc-timeout" not in recorder.received[-1].metadata
            assert recorder.received[-1].time_remaining is None  # no deadline: none sent
        finally:
            await pool.close()


async def test_tls_upstream_with_client_certificate(tmp_path: Path) -> None:
    ca = CertificateAuthority()
    server = ca.issue("127.0.0.1", server=True)
    client_cert, client_key = ca.issue("modelgate").write(tmp_path, "client")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.pem)
    async with recording_upstream(tls=(server.cert, server.key, ca.pem)) as recorder:
        with_cert = parse_upstream(f"secure=127.0.0.1:{recorder.port},ca={ca_file},"
                                   f"cert={client_cert},key={client_key}")
        without = parse_upstream(f"nocert=127.0.0.1:{recorder.port},ca={ca_file}")
        pool = UpstreamPool([with_cert, without], probe_interval_s=3600)
        await pool.start()
        try:
            assert pool.upstreams["secure"].healthy
            assert not pool.upstreams["nocert"].healthy  # the server wants a certificate
            spec = spec_of(add_model_config("gw_add"), "gw_add")
            runtime = await loaded(pool, spec, "add", upstreams=("secure",))
            x = np.ones((1, 4), np.float32)
            out = await runtime.infer(InferRequest(inputs={"x": x}, outputs=("y",)))
            np.testing.assert_array_equal(out["y"], x)
        finally:
            await pool.close()


def test_raw_input_bytes_are_sent_as_the_same_object() -> None:
    data = np.arange(6, dtype=np.float32).tobytes()
    view = np.frombuffer(data, dtype=np.float32).reshape(2, 3)
    assert raw_bytes(DataType.FP32, view) is data
    # A copy or a slice is serialized instead.
    assert raw_bytes(DataType.FP32, view[:1]) == data[:12]
    assert raw_bytes(DataType.BYTES, np.array([[b"ab", b""]], dtype=object)) == (
        b"\x02\x00\x00\x00ab\x00\x00\x00\x00"
    )
