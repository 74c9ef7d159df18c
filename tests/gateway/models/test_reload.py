"""Hot reload: rolling a model from version 1 to 2 under continuous load with zero failed
requests, broken versions that never take traffic, warm-up, draining, and the poller's
two-poll rule for half-written folders."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from gateway.errors import ModelNotFoundError
from gateway.models.backends import RuntimeFactory
from gateway.models.manager import ModelManager, VersionState
from gateway.models.reloader import Reloader
from model_store.config import parse_config_text, spec_from_config
from model_store.errors import ModelConfigError
from model_store.repository import ModelRepository
from model_store.spec import ModelId, ModelSpec
from model_store.warmup import warmup_samples
from modelgate_pb import grpc_service_pb2 as pb
from runtimes.base import InferRequest, Runtime
from runtimes.onnx_runtime import OnnxOptions
from tests.gateway.models.test_shadow import sample
from tests.support import models
from tests.support.fake_runtime import FakeRuntime
from tests.support.gateway import RunningGateway, running_gateway
from tests.support.waiting import until, wait_until

ALL_VERSIONS = "version_policy: { all {} }\n"
CLIENTS = 4
RUN_LIMIT_S = 90.0

def index(gw: RunningGateway, name: str) -> dict[str, tuple[str, str]]:
    """RepositoryIndex of one model: version -> (state, reason)."""
    response = gw.stub().RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
    return {m.version: (m.state, m.reason) for m in response.models if m.name == name}


@dataclass
class LoadClient:
    """One client sending requests back to back until told to stop, recording the version
    of every answer (checked against the answer's value) and every failure."""

    target: str
    version: str
    stop: threading.Event
    answers: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def run(self) -> None:
        x = np.arange(4, dtype=np.float32).reshape(1, 4)
        tensor = tc.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(x)
        give_up = time.monotonic() + RUN_LIMIT_S
        with tc.InferenceServerClient(self.target) as client:
            while not self.stop.is_set() and time.monotonic() < give_up:
                try:
                    result = client.infer("adder", [tensor], model_version=self.version,
                                          client_timeout=20)
                except InferenceServerException as exc:
                    self.failures.append(f"{exc.status()}: {exc.message()}")
                    continue
                answered = int(result.get_response().model_version)
                if not np.array_equal(result.as_numpy("y"), x + answered):
                    self.failures.append(f"version {answered} gave {result.as_numpy('y')}")
                self.answers.append(answered)


def test_rolling_v1_to_v2_under_load_drops_no_request(tmp_path: Path) -> None:
    config = models.add_model_config("adder", extra=ALL_VERSIONS)
    models.write_model(tmp_path, "adder", 1, models.add_constant(1.0), config)
    routing = tmp_path / "adder" / "routing.toml"
    routing.write_text("[labels]\nstable = 1\n", encoding="utf-8")
    with running_gateway(tmp_path, poll_interval=0.1) as gw:
        stop = threading.Event()
        clients = [LoadClient(gw.target, "stable" if i % 2 else "", stop) for i in range(CLIENTS)]
        threads = [threading.Thread(target=c.run) for c in clients]
        for thread in threads:
            thread.start()
        try:
            wait_until(lambda: all(len(c.answers) >= 5 for c in clients), "first answers")
            # 1. A new version folder appears: unversioned requests move to it once ready.
            models.write_model(tmp_path, "adder", 2, models.add_constant(2.0), None)
            wait_until(lambda: all(c.answers[-1] == 2 for c in clients if not c.version),
                       "unversioned requests on version 2")
            # 2. The label moves: labelled requests follow, no model reloads.
            routing.write_text("[labels]\nstable = 2\n", encoding="utf-8")
            wait_until(lambda: all(c.answers[-1] == 2 for c in clients), "label on version 2")
            # 3. Version 1 leaves the store: it drains and unloads while traffic continues.
            shutil.rmtree(tmp_path / "adder" / "1")
            wait_until(lambda: "1" not in index(gw, "adder"), "version 1 unloaded")
            counts = [len(c.answers) for c in clients]
            wait_until(lambda: all(len(c.answers) >= n + 5 for c, n in zip(clients, counts,
                                                                            strict=True)),
                       "answers after the unload")
        finally:
            stop.set()
            for thread in threads:
                thread.join(RUN_LIMIT_S + 30)
        for client in clients:
            assert client.failures == []
            # The answers switch once, from 1 to 2, never back.
            assert client.answers == sorted(client.answers)
            assert client.answers[0] == 1 and client.answers[-1] == 2
        with tc.InferenceServerClient(gw.target) as c:
            assert not c.is_model_ready("adder", "1")
            assert c.is_model_ready("adder", "2")


def test_a_broken_version_is_never_served_and_the_reason_is_visible(tmp_path: Path) -> None:
    # latest-1 selects version 3 alone once it appears: version 2 must still keep serving.
    models.write_model(tmp_path, "adder", 2, models.add_constant(2.0),
                       models.add_model_config("adder"))
    with running_gateway(tmp_path, poll_interval=0.1) as gw:
        models.write_model(tmp_path, "adder", 3, b"not an onnx file", None)
        wait_until(lambda: index(gw, "adder").get("3", ("", ""))[0] == "UNAVAILABLE",
                   "version 3 reported")
        assert "load failed" in index(gw, "adder")["3"][1]
        assert index(gw, "adder")["2"][0] == "READY"
        text = gw.gateway.metrics.exposition().decode()
        assert sample(text, "modelgate_model_version_state", model="adder", version="3",
                      state="UNAVAILABLE") == 1
        assert sample(text, "modelgate_model_version_state", model="adder", version="2",
                      state="READY") == 1
        assert sample(text, "modelgate_model_load_failures_total", model="adder") == 1
        with tc.InferenceServerClient(gw.target) as client:
            x = np.zeros((1, 4), dtype=np.float32)
            tensor = tc.InferInput("x", [1, 4], "FP32")
            tensor.set_data_from_numpy(x)
            for _ in range(10):
                result = client.infer("adder", [tensor])
                assert result.get_response().model_version == "2"
                np.testing.assert_array_equal(result.as_numpy("y"), x + 2)
            with pytest.raises(InferenceServerException) as info:
                client.infer("adder", [tensor], model_version="3")
            assert info.value.status() == "StatusCode.UNAVAILABLE"
            assert "load failed" in info.value.message()
        ready = gw.stub().ModelReady.with_call(
            pb.ModelReadyRequest(name="adder", version="3"), timeout=10
        )
        assert ready[0].ready is False
        trailers = dict(ready[1].trailing_metadata())
        assert "load failed" in trailers["modelgate-reason"]


def test_a_failed_warm_up_keeps_the_version_off_traffic(tmp_path: Path) -> None:
    warmup = ('model_warmup [{ name: "from_file" batch_size: 1 inputs { key: "x" value: '
              '{ data_type: TYPE_FP32 dims: [4] input_data_file: "missing.bin" } } }]\n')
    models.write_model(tmp_path, "warm", 1, models.add_constant(1.0),
                       models.add_model_config("warm", extra=warmup))
    with running_gateway(tmp_path) as gw:
        state, reason = index(gw, "warm")["1"]
        assert state == "UNAVAILABLE"
        assert "warm-up failed" in reason and "missing.bin" in reason


# ---- the manager, with a recording runtime (faults real parts cannot make on cue) ----


class Recording:
    """A runtime factory whose runtimes are FakeRuntimes kept for inspection."""

    def __init__(self) -> None:
        self.made: list[FakeRuntime] = []

    def __call__(self, model: ModelId, spec: ModelSpec, path: Path) -> Runtime:
        runtime = FakeRuntime(spec, model.version)
        self.made.append(runtime)
        return runtime


def adder_store(root: Path, *versions: int, extra: str = ALL_VERSIONS) -> None:
    for version in versions:
        models.write_model(root, "adder", version, models.add_constant(float(version)),
                           models.add_model_config("adder", extra=extra))


async def test_warm_up_runs_zeros_of_the_declared_shape_before_ready(tmp_path: Path) -> None:
    adder_store(tmp_path, 1)
    factory = Recording()
    manager = ModelManager(ModelRepository(tmp_path), factory)
    await manager.start()
    (runtime,) = factory.made
    (call,) = runtime.calls
    assert call.warmup == "zeros" and call.rows == 1
    np.testing.assert_array_equal(call.inputs["x"], np.zeros((1, 4), dtype=np.float32))
    assert manager.version("adder", "1").state is VersionState.READY
    await manager.stop()


async def test_a_replaced_version_finishes_in_flight_requests_before_unloading(
    tmp_path: Path,
) -> None:
    adder_store(tmp_path, 1)
    factory = Recording()
    manager = ModelManager(ModelRepository(tmp_path), factory)
    await manager.start()
    old = factory.made[0]
    old.hold = True
    lease = manager.acquire("adder")
    running = asyncio.create_task(lease.runtime.infer(_request()))
    await old.wait_calls(2)  # the warm-up, then this request
    adder_store(tmp_path, 2)
    shutil.rmtree(tmp_path / "adder" / "1")
    await manager.reconcile(["adder"])
    # Version 2 serves new requests; version 1 no longer takes any but is not unloaded yet.
    with manager.acquire("adder") as newer:
        assert newer.version.id.version == 2
    retired = manager.version("adder", "1")
    assert retired.state is VersionState.UNLOADING
    # The drain has reached the point where it waits for in-flight requests: with none it
    # would have unloaded by now, so "not unloaded" means the request holds it.
    await until(lambda: retired.idle is not None, "the drain waiting for in-flight requests")
    assert not old.unloaded
    old.release()
    await running
    lease.release()
    await until(lambda: old.unloaded, "version 1 unloaded")
    assert old.unloaded
    assert "1" not in {str(n) for n in manager.model("adder").versions}
    await manager.stop()


async def test_stopping_while_a_version_drains_waits_for_it_once(tmp_path: Path) -> None:
    adder_store(tmp_path, 1, 2)
    factory = Recording()
    manager = ModelManager(ModelRepository(tmp_path), factory)
    await manager.start()
    lease = manager.acquire("adder", "1")
    shutil.rmtree(tmp_path / "adder" / "1")
    await manager.reconcile()
    draining = manager.version("adder", "1")
    stopping = asyncio.create_task(manager.stop())
    # Version 1's drain waits for its in-flight request; stop() waits for that drain.
    await until(lambda: draining.idle is not None, "the drain waiting for in-flight requests")
    assert not stopping.done()  # version 1 still has a request in flight
    lease.release()
    await asyncio.wait_for(stopping, 30)
    assert all(runtime.unloaded for runtime in factory.made)


async def test_a_model_removed_from_the_store_is_unloaded_and_forgotten(tmp_path: Path) -> None:
    adder_store(tmp_path, 1)
    factory = Recording()
    manager = ModelManager(ModelRepository(tmp_path), factory)
    await manager.start()
    shutil.rmtree(tmp_path / "adder")
    await manager.reconcile()
    await until(lambda: factory.made[0].unloaded, "the removed model unloaded")
    assert factory.made[0].unloaded
    assert manager.models() == []
    with pytest.raises(ModelNotFoundError):
        manager.acquire("adder")
    await manager.stop()


async def test_a_changed_version_reloads_side_by_side(tmp_path: Path) -> None:
    adder_store(tmp_path, 1)
    factory = Recording()
    manager = ModelManager(ModelRepository(tmp_path), factory)
    await manager.start()
    first = manager.acquire("adder")
    first.release()
    await manager.reconcile()
    assert len(factory.made) == 1  # nothing changed: nothing reloads
    models.write_model(tmp_path, "adder", 1, models.add_constant(5.0), None)
    await manager.reconcile()
    assert len(factory.made) == 2
    with manager.acquire("adder") as lease:
        assert lease.runtime is factory.made[1]
    await manager.stop()


def test_the_poller_waits_until_a_folder_is_unchanged_across_two_polls(tmp_path: Path) -> None:
    adder_store(tmp_path, 1)
    data = models.add_constant(2.0).SerializeToString()

    async def scenario() -> list[str]:
        factory = RuntimeFactory(OnnxOptions(device="cpu"))
        manager = ModelManager(ModelRepository(tmp_path), factory)
        reloader = Reloader(manager, tmp_path, interval=1.0)
        await reloader.snapshot()
        await manager.start()
        seen: list[str] = []
        folder = tmp_path / "adder" / "2"
        folder.mkdir()
        (folder / "model.onnx").write_bytes(data[: len(data) // 2])  # a copy in progress
        seen.append(f"poll1:{sorted(await reloader.poll_once())}")
        with (folder / "model.onnx").open("ab") as out:
            out.write(data[len(data) // 2 :])
        seen.append(f"poll2:{sorted(await reloader.poll_once())}")
        seen.append(f"versions:{sorted(manager.model('adder').versions)}")
        seen.append(f"poll3:{sorted(await reloader.poll_once())}")
        seen.append(f"state2:{manager.version('adder', '2').state.value}")
        seen.append(f"poll4:{sorted(await reloader.poll_once())}")
        await manager.stop()
        return seen

    assert asyncio.run(scenario()) == [
        "poll1:[]", "poll2:[]", "versions:[1]", "poll3:['adder']", "state2:READY", "poll4:[]",
    ]


def _request() -> InferRequest:
    return InferRequest(inputs={"x": np.zeros((1, 4), dtype=np.float32)})


def test_warm_up_samples_follow_model_warmup_or_default_to_zeros(tmp_path: Path) -> None:
    def spec(extra: str = "", config: str | None = None) -> ModelSpec:
        text = config or models.add_model_config("m", extra=extra)
        return spec_from_config(parse_config_text(text, "m"))

    (zeros,) = warmup_samples(spec(), tmp_path)
    assert (zeros.rows, zeros.count) == (1, 1) and zeros.inputs["x"].shape == (1, 4)
    strings = models.config_pbtxt("m", [("s", "BYTES", [2])], [("o", "BYTES", [2])])
    (text,) = warmup_samples(spec(config=strings), tmp_path)
    assert text.inputs["s"].tolist() == [[b"", b""]]
    declared = ('model_warmup [{ name: "r" batch_size: 2 count: 3 inputs { key: "x" value: '
                '{ data_type: TYPE_FP32 dims: [4] random_data: true } } },'
                '{ name: "f" batch_size: 1 inputs { key: "x" value: '
                '{ data_type: TYPE_FP32 dims: [4] input_data_file: "ones.bin" } } }]\n')
    (tmp_path / "warmup").mkdir()
    (tmp_path / "warmup" / "ones.bin").write_bytes(np.ones(4, np.float32).tobytes())
    random_sample, from_file = warmup_samples(spec(declared), tmp_path)
    assert (random_sample.name, random_sample.rows, random_sample.count) == ("r", 2, 3)
    assert random_sample.inputs["x"].shape == (2, 4)
    np.testing.assert_array_equal(from_file.inputs["x"], np.ones((1, 4), np.float32))
    escape = declared.replace("ones.bin", "../../etc/passwd")
    with pytest.raises(ModelConfigError, match="no file"):
        warmup_samples(spec(escape), tmp_path)
