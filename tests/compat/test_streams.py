"""tritonclient's stream API (grpc: start_stream / async_stream_infer / stop_stream; grpc.aio:
stream_infer) against the gateway and tritonserver: one good message and one for an
unknown model on the same stream; both servers answer the good one alike and the bad one
with an error, and modelgate's error text starts with the message's id."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from tests.compat.calls import X, outputs_of
from tests.compat.conftest import Server

pytestmark = pytest.mark.timeout(300)

# (id, model): the second names no model either server has.
MESSAGES = (("good-1", "add"), ("bad-2", "nope"))


def _inputs(module: Any) -> list[Any]:
    tensor = module.InferInput("x", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    return [tensor]


def stream_sync(server: Server) -> dict[str, Any]:
    """Answers by id: the outputs, or the error's text."""
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc)
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for request_id, model in MESSAGES:
            client.async_stream_infer(model, _inputs(grpcclient), request_id=request_id)
        got = [answers.get(timeout=60) for _ in MESSAGES]
        client.stop_stream()
    finally:
        client.close()
    return _by_id(got)


def stream_aio(server: Server) -> dict[str, Any]:
    async def run() -> list[tuple[Any, Any]]:
        client = grpcaio.InferenceServerClient(server.grpc)

        async def requests() -> AsyncIterator[dict[str, Any]]:
            for request_id, model in MESSAGES:
                yield {"model_name": model, "inputs": _inputs(grpcaio),
                       "request_id": request_id}

        got = []
        try:
            async for result, error in client.stream_infer(requests()):
                got.append((result, error))
                if len(got) == len(MESSAGES):
                    break
        finally:
            await client.close()
        return got

    return _by_id(asyncio.run(run()))


def _by_id(got: list[tuple[Any, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for result, error in got:
        if error is not None:
            assert isinstance(error, InferenceServerException)
            out[f"error {len(out)}"] = str(error.message())
        else:
            out[result.get_response().id] = outputs_of(result, "grpc")
    return out


@pytest.mark.parametrize("stream", [stream_sync, stream_aio], ids=["grpc", "grpc.aio"])
def test_a_stream_answers_as_triton_and_names_the_failed_message(
    modelgate: Server, triton: Server, stream: Any,
) -> None:
    ours, theirs = stream(modelgate), stream(triton)
    assert ours["good-1"] == theirs["good-1"] == {
        "doubled": (X * 2).tolist(), "y": (X + 1).tolist()}
    errors = [text for key, text in ours.items() if key.startswith("error")]
    assert len(errors) == 1 and len(theirs) == 2
    # The id is in the text: a callback can match the error to its message.
    assert errors[0].startswith("id 'bad-2': ") and "unknown model 'nope'" in errors[0]


def test_every_message_of_a_stream_is_answered(modelgate: Server) -> None:
    """Many messages in flight on one stream, each answered once, by id."""
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(modelgate.grpc)
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for n in range(20):
            client.async_stream_infer("add", _inputs(grpcclient), request_id=f"m{n}")
        got = [answers.get(timeout=60) for _ in range(20)]
        client.stop_stream()
    finally:
        client.close()
    assert all(error is None for _, error in got)
    assert sorted(r.get_response().id for r, _ in got) == sorted(f"m{n}" for n in range(20))
    np.testing.assert_array_equal(got[0][0].as_numpy("y"), X + 1)
