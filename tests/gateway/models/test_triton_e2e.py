"""End to end: clients -> real gateway -> two real tritonserver processes. Results equal
direct Triton calls for every datatype (raw and typed), statuses come back as Triton sent
them, load is balanced, a killed upstream costs only its in-flight requests and takes traffic
again once restarted, the batcher merges requests when asked, upstream models are
discovered, deadline and trace context arrive upstream, and the CLI takes --triton."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from gateway.settings import SettingsError, load_settings
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc
from runtimes.triton_wire import decode_outputs
from tests.runtimes.test_triton_runtime import TRACEPARENT, sample
from tests.support.gateway import GatewayProcess, RunningGateway, running_gateway
from tests.support.models import (
    ONNX_TYPES,
    add_constant,
    add_model_config,
    all_types_config,
    config_pbtxt,
)
from tests.support.recording_upstream import RecordingUpstream, recording_upstream
from tests.support.triton_server import (
    TYPED,
    TritonServer,
    triton_install,
    triton_servers,
    write_python_model,
)
from tests.support.waiting import wait_until as wait_for

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TYPED_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def remote_config(config: str, upstreams: str, remote_model: str, extra: str = "") -> str:
    """A store config.pbtxt pointing the model at Triton upstreams."""
    config = config.replace('platform: "onnxruntime_onnx"', 'backend: "triton"')
    return config + extra + (
        f'parameters {{ key: "upstream" value {{ string_value: "{upstreams}" }} }}\n'
        f'parameters {{ key: "remote_model" value {{ string_value: "{remote_model}" }} }}\n'
    )


def write_remote(store: Path, name: str, config: str) -> None:
    (store / name / "1").mkdir(parents=True, exist_ok=True)  # empty, as an ensemble's
    (store / name / "config.pbtxt").write_text(config, encoding="utf-8")


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[TritonServer, TritonServer]]:
    with triton_servers(2, ("all_types", "all_types_typed", "add")) as (a, b):
        yield a, b


@pytest.fixture(scope="module")
def gateway(servers: tuple[TritonServer, TritonServer],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    a, b = servers
    store = tmp_path_factory.mktemp("triton-store")
    write_remote(store, "remote_all", remote_config(all_types_config("remote_all"), "a",
                                                    "all_types"))
    typed = config_pbtxt("remote_typed", [(f"in_{t}", t, [3]) for t in TYPED],
                         [(f"out_{t}", t, [3]) for t in TYPED])
    write_remote(store, "remote_typed", remote_config(typed, "a", "all_types_typed"))
    write_remote(store, "remote_add", remote_config(add_model_config("remote_add"), "a,b",
                                                    "add"))
    write_remote(store, "remote_b_only", remote_config(add_model_config("remote_b_only"), "b",
                                                       "add"))
    write_remote(store, "remote_missing", remote_config(add_model_config("remote_missing"), "a",
                                                        "no_such_model"))
    batching = "dynamic_batching { max_queue_delay_microseconds: 500000 }\n"
    write_remote(store, "remote_batched", remote_config(
        add_model_config("remote_batched", max_batch_size=8), "a", "add", extra=batching))
    with running_gateway(store, triton=(f"a={a.target}", f"b={b.target}"),
                         triton_probe_interval_s=0.2) as gw:
        yield gw


def infer_add(target: str, model: str, rows: int = 1) -> np.ndarray:
    client = tc.InferenceServerClient(target)
    x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    tensor = tc.InferInput("x", [rows, 4], "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(model, [tensor], client_timeout=30)
    y: np.ndarray = result.as_numpy("y")
    np.testing.assert_array_equal(y, x + 1)
    return y


def add_count(server: TritonServer) -> int:
    """Requests the upstream's own statistics say model ``add`` ran successfully."""
    stats = tc.InferenceServerClient(server.target).get_inference_statistics("add")
    return int(stats.model_stats[0].inference_stats.success.count)


def health(gateway: RunningGateway, service: str) -> int:
    """The gateway's gRPC health status of one model."""
    with grpc.insecure_channel(gateway.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10)
    return int(reply.status)

def test_every_datatype_raw_equals_direct_triton(gateway: RunningGateway,
                                                 servers: tuple[TritonServer, ...]) -> None:
    def call(target: str, model: str) -> dict[str, np.ndarray]:
        inputs = []
        for datatype in ONNX_TYPES:
            tensor = tc.InferInput(f"in_{datatype}", [2, 3], datatype)
            tensor.set_data_from_numpy(sample(datatype))
            inputs.append(tensor)
        result = tc.InferenceServerClient(target).infer(model, inputs, client_timeout=30)
        return {t: result.as_numpy(f"out_{t}") for t in ONNX_TYPES}

    through = call(gateway.target, "remote_all")
    direct = call(servers[0].target, "all_types")
    for datatype in ONNX_TYPES:
        assert through[datatype].dtype == direct[datatype].dtype, datatype
        np.testing.assert_array_equal(through[datatype], direct[datatype], err_msg=datatype)
        np.testing.assert_array_equal(through[datatype], sample(datatype), err_msg=datatype)


def test_every_datatype_typed_equals_direct_triton(gateway: RunningGateway,
                                                   servers: tuple[TritonServer, ...]) -> None:
    def request(model: str) -> pb.ModelInferRequest:
        message = pb.ModelInferRequest(model_name=model)
        for datatype in TYPED:
            array = sample(datatype)
            tensor = message.inputs.add(name=f"in_{datatype}", datatype=datatype,
                                        shape=array.shape)
            getattr(tensor.contents, TYPED_FIELD[datatype]).extend(array.reshape(-1).tolist())
            out = message.outputs.add(name=f"out_{datatype}")
            out.parameters["binary_data"].bool_param = False
        return message

    through = gateway.stub().ModelInfer(request("remote_typed"), timeout=30)
    assert not through.raw_output_contents  # typed, as the client asked
    with grpc.insecure_channel(servers[0].target) as channel:
        direct = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request("all_types_typed"), timeout=30)
    ours, theirs = decode_outputs(through), decode_outputs(direct)
    for datatype in TYPED:
        name = f"out_{datatype}"
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=datatype)
        np.testing.assert_array_equal(ours[name], sample(datatype), err_msg=datatype)


def test_upstream_not_found_stays_not_found(gateway: RunningGateway) -> None:
    with pytest.raises(InferenceServerException) as caught:
        infer_add(gateway.target, "remote_missing")
    assert caught.value.status() == "StatusCode.NOT_FOUND"
    assert "no_such_model" in str(caught.value.message())


def test_metadata_readiness_and_config(gateway: RunningGateway) -> None:
    client = tc.InferenceServerClient(gateway.target)
    assert client.is_model_ready("remote_add")
    assert not client.is_model_ready("remote_missing")  # no upstream has it
    meta = client.get_model_metadata("remote_add")
    assert meta.platform == "triton"
    assert [(i.name, i.datatype, list(i.shape)) for i in meta.inputs] == [("x", "FP32", [-1, 4])]
    config = client.get_model_config("remote_add").config
    assert config.backend == "triton"
    assert config.parameters["upstream"].string_value == "a,b"


def test_balancing_spreads_load(gateway: RunningGateway,
                                servers: tuple[TritonServer, TritonServer]) -> None:
    def spread_of(send: Callable[[], object]) -> list[int]:
        before = [add_count(s) for s in servers]
        send()
        return [add_count(s) - n for s, n in zip(servers, before, strict=True)]

    # One at a time nothing is outstanding: every pick is a tie, and ties are taken in turn.
    sequential = spread_of(lambda: [infer_add(gateway.target, "remote_add") for _ in range(20)])
    assert sequential == [10, 10]

    # Concurrent: the one with fewer outstanding requests gets the next (a slower upstream
    # gets less), but both take a share.
    def concurrent() -> None:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: infer_add(gateway.target, "remote_add"), range(40)))

    spread = spread_of(concurrent)
    assert sum(spread) == 40 and min(spread) > 0, spread


def test_batcher_merges_client_requests_when_the_config_asks(
    gateway: RunningGateway, servers: tuple[TritonServer, TritonServer]
) -> None:
    a = servers[0]
    requests_before, rows_before = add_count(a), _rows(a)
    # 8 one-row requests meet max_batch_size 8 well inside the 0.5 s queue delay.
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: infer_add(gateway.target, "remote_batched"), range(8)))
    assert _rows(a) - rows_before == 8
    assert add_count(a) - requests_before < 8  # fewer upstream requests than client ones


def _rows(server: TritonServer) -> int:
    stats = tc.InferenceServerClient(server.target).get_inference_statistics("add")
    return int(stats.model_stats[0].inference_count)


def test_deadline_and_trace_context_arrive_upstream(tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    upstream = recording_upstream()
    recorder: RecordingUpstream = asyncio.run_coroutine_threadsafe(
        upstream.__aenter__(), loop).result(30)
    try:
        write_remote(tmp_path, "recorded", remote_config(add_model_config("recorded"), "rec",
                                                         "add"))
        with running_gateway(tmp_path, triton=(f"rec=127.0.0.1:{recorder.port}",)) as gw:
            request = pb.ModelInferRequest(model_name="recorded")
            request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
            request.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
            request.outputs.add(name="y")  # the recorder echoes x under that name
            gw.stub().ModelInfer(request, timeout=5,
                                 metadata=(("traceparent", TRACEPARENT),))
        got = recorder.received[-1]
        assert got.metadata["traceparent"] == TRACEPARENT
        # The client's 5 s, less what the gateway spent (gRPC rounds to its wire units).
        assert got.time_remaining is not None and 0 < got.time_remaining <= 5.5
    finally:
        asyncio.run_coroutine_threadsafe(upstream.__aexit__(None, None, None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_discovery_exports_an_upstreams_models_and_keeps_them_fresh(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_python_model(repo, "add", add_constant(1.0).SerializeToString(),
                       add_model_config("add"))
    store = tmp_path / "store"
    store.mkdir()
    server = TritonServer(triton_install(), repo, tmp_path,
                          ("--model-control-mode=poll", "--repository-poll-secs=1"))
    server.start()
    try:
        with running_gateway(store, triton=(f"c={server.target},export=all",),
                             triton_refresh_interval_s=0.3, triton_probe_interval_s=0.2) as gw:
            client = tc.InferenceServerClient(gw.target)
            index = {m.name: m.state for m in client.get_model_repository_index().models}
            assert index == {"add": "READY"}
            infer_add(gw.target, "add")
            assert client.get_model_config("add").config.backend == "triton"

            write_python_model(repo, "add_two", add_constant(1.0).SerializeToString(),
                               add_model_config("add_two"))
            wait_for(lambda: client.is_model_ready("add_two"), "add_two to be discovered")
            infer_add(gw.target, "add_two")

            shutil.rmtree(repo / "add")  # the upstream unloads it; the gateway follows
            wait_for(lambda: "add" not in {m.name for m in
                                           client.get_model_repository_index().models},
                     "add to be gone")
            with pytest.raises(InferenceServerException) as caught:
                infer_add(gw.target, "add")
            assert caught.value.status() == "StatusCode.NOT_FOUND"
    finally:
        server.stop()


def test_settings_take_upstreams_from_every_layer(tmp_path: Path) -> None:
    config = tmp_path / "modelgate.toml"
    config.write_text('triton = ["a=127.0.0.1:8001", "b=127.0.0.1:9001,max_in_flight=4"]\n')
    assert load_settings(config, {}, {}).triton == ("a=127.0.0.1:8001",
                                                    "b=127.0.0.1:9001,max_in_flight=4")
    env = {"MODELGATE_TRITON": "c=h:1 d=h:2,export=all"}
    assert load_settings(config, env, {}).triton == ("c=h:1", "d=h:2,export=all")
    assert load_settings(config, env, {"triton": ["e=h:3"]}).triton == ("e=h:3",)
    with pytest.raises(SettingsError, match=r"setting 'triton'.*not HOST:PORT"):
        load_settings(None, {}, {"triton": ["a=nowhere"]})
    with pytest.raises(SettingsError, match="declared twice"):
        load_settings(None, {}, {"triton": ["a=h:1", "a=h:2"]})


def test_cli_serves_with_repeated_triton_flags(gateway: RunningGateway,
                                               servers: tuple[TritonServer, TritonServer],
                                               tmp_path: Path) -> None:
    a, b = servers
    write_remote(tmp_path, "remote_add", remote_config(add_model_config("remote_add"), "a,b",
                                                       "add"))
    args = ["--store", str(tmp_path), "--metrics-port", "0",
            "--triton", f"a={a.target}", "--triton", f"b={b.target},max_in_flight=8"]
    with GatewayProcess(args) as process:
        infer_add(process.target, "remote_add", rows=3)


def test_killed_upstream_costs_only_its_in_flight_requests_and_comes_back(
    gateway: RunningGateway, servers: tuple[TritonServer, TritonServer]
) -> None:
    """Last in the module: it kills and restarts upstream b."""
    _, b = servers
    pool = gateway.gateway.upstreams
    client = tc.InferenceServerClient(gateway.target)
    outcomes: list[tuple[float, str]] = []  # (start on the monotonic clock, status)
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                infer_add(gateway.target, "remote_add")
                outcomes.append((started, "OK"))
            except InferenceServerException as exc:
                outcomes.append((started, str(exc.status())))

    workers = [threading.Thread(target=traffic) for _ in range(6)]
    for worker in workers:
        worker.start()
    try:
        wait_for(lambda: len(outcomes) >= 60, "traffic before the kill")
        b.kill()
        wait_for(lambda: not pool.upstreams["b"].healthy, "b to be taken out")
        taken_out = time.monotonic()
        wait_for(lambda: sum(1 for t, _ in outcomes if t > taken_out) >= 60,
                 "traffic after the kill")
        assert not client.is_model_ready("remote_b_only")
        assert client.is_model_ready("remote_add")  # a still has it
        wait_for(lambda: health(gateway, "remote_b_only") == NOT_SERVING,
                 "remote_b_only's health to say NOT_SERVING")
        assert health(gateway, "remote_add") == SERVING
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
    failures = [code for _, code in outcomes if code != "OK"]
    assert set(failures) <= {"StatusCode.UNAVAILABLE"}, failures
    assert len(failures) <= len(workers)  # at most the requests in flight to b
    assert all(code == "OK" for started, code in outcomes if started > taken_out)

    b.start()  # same port; the gateway is not restarted
    wait_for(lambda: pool.upstreams["b"].healthy, "b to be probed back")
    wait_for(lambda: client.is_model_ready("remote_b_only"), "remote_b_only to be ready")
    wait_for(lambda: health(gateway, "remote_b_only") == SERVING,
             "remote_b_only's health to say SERVING")
    with ThreadPoolExecutor(4) as workers_pool:
        list(workers_pool.map(lambda _: infer_add(gateway.target, "remote_add"), range(20)))
    assert add_count(b) > 0  # the restarted process took a share
    infer_add(gateway.target, "remote_b_only")


def test_a_stream_reaches_models_served_from_triton_upstreams(
    gateway: RunningGateway, servers: tuple[TritonServer, TritonServer]
) -> None:
    """ModelStreamInfer messages for upstream models run through the runtime as unary calls
    do (spread over both upstreams); one naming a model the upstream lacks is answered with
    an error in the stream, and the stream goes on."""
    before = sum(add_count(s) for s in servers)
    messages = []
    for i in range(10):
        message = pb.ModelInferRequest(model_name="remote_add", id=str(i))
        message.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        message.raw_input_contents.append(np.full((1, 4), float(i), np.float32).tobytes())
        messages.append(message)
    missing = pb.ModelInferRequest()
    missing.CopyFrom(messages[0])
    missing.model_name, missing.id = "remote_missing", "missing"
    messages.insert(5, missing)
    answers = list(gateway.stub().ModelStreamInfer(iter(messages), timeout=60))
    assert len(answers) == 11
    failed = [a for a in answers if a.error_message]
    assert [a.infer_response.id for a in failed] == ["missing"]
    for answer in answers:
        if answer.error_message:
            continue
        y = np.frombuffer(answer.infer_response.raw_output_contents[0], np.float32)
        np.testing.assert_array_equal(y, np.full(4, float(answer.infer_response.id) + 1))
    assert sum(add_count(s) for s in servers) - before == 10
