"""The serving event loop: uvloop when installed (auto) or asked for, asyncio when asked;
the real `modelgate serve` answers inference on either."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tritonclient.grpc as tc

from gateway.process import event_loop
from gateway.process.event_loop import EventLoopError, loop_factory
from gateway.settings import SettingsError, load_settings
from tests.support.gateway import GatewayProcess


def test_auto_takes_uvloop_when_installed() -> None:
    import uvloop

    factory = loop_factory("auto")
    assert factory is uvloop.new_event_loop
    assert loop_factory("uvloop") is uvloop.new_event_loop
    assert loop_factory("asyncio") is None


def test_uvloop_insisted_on_but_missing_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(event_loop, "uvloop_available", lambda: False)
    assert loop_factory("auto") is None  # auto falls back quietly
    monkeypatch.setitem(__import__("sys").modules, "uvloop", None)  # import fails
    with pytest.raises(EventLoopError, match="uvloop is not installed"):
        event_loop.run(asyncio.sleep(0), "uvloop")


def test_a_bad_choice_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match="event_loop"):
        load_settings(None, {"MODELGATE_EVENT_LOOP": "trio"}, {})


@pytest.mark.parametrize("choice", ["uvloop", "asyncio"])
def test_serve_answers_on_either_loop(choice: str) -> None:
    with GatewayProcess(["--event-loop", choice]) as gateway:
        client = tc.InferenceServerClient(gateway.target)
        x = tc.InferInput("features", [1, 4], "FP32")
        x.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32))
        result = client.infer("iris", [x], model_version="1")
        assert result.as_numpy("label").shape == (1, 1)
        client.close()
        assert gateway.stop() == 0
        assert f"event loop: {choice}" in gateway.log()
