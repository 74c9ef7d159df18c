"""Triton's system shared memory extension (protocol/extension_shared_memory) through all four
tritonclient clients, answer for answer against tritonserver: register an input and an
output region, infer reading one and writing the other, status, unregister. The refusals
(missing key, unknown region) are rows of test_tritonclient_calls.py."""

from __future__ import annotations

import asyncio
import inspect
import os
from typing import Any

import numpy as np
import pytest
import tritonclient.utils.shared_memory as shm

from tests.compat.calls import GRPC, HTTP, KINDS, MODULES, X
from tests.compat.conftest import Server

pytestmark = pytest.mark.timeout(300)

NBYTES = X.nbytes


async def _do(client: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """A client method's answer, whether the client is a sync or an aio one."""
    answer = getattr(client, method)(*args, **kwargs)
    return await answer if inspect.isawaitable(answer) else answer


def _names(status: Any, kind: str) -> list[str]:
    if kind in GRPC:
        return sorted(status.get("regions", {}))
    return sorted(region["name"] for region in status)


async def _round_trip(server: Server, kind: str) -> tuple[Any, ...]:
    """(y and doubled as read from the output region, the regions listed after registering,
    those listed after unregistering)."""
    module = MODULES[kind]
    url = server.grpc if kind in GRPC else server.http
    as_json = {"as_json": True} if kind in GRPC else {}
    tag = f"{os.getpid()}_{kind.replace('.', '_')}_{url.rpartition(':')[2]}"
    keys = {"in": f"/mg_compat_in_{tag}", "out": f"/mg_compat_out_{tag}"}
    handles = {"in": shm.create_shared_memory_region("in", keys["in"], NBYTES),
               "out": shm.create_shared_memory_region("out", keys["out"], 2 * NBYTES)}
    shm.set_shared_memory_region(handles["in"], [X])
    client = module.InferenceServerClient(url)
    try:
        await _do(client, "register_system_shared_memory", "in", keys["in"], NBYTES)
        await _do(client, "register_system_shared_memory", "out", keys["out"], 2 * NBYTES)
        listed = _names(await _do(client, "get_system_shared_memory_status", **as_json), kind)
        tensor = module.InferInput("x", [2, 4], "FP32")
        tensor.set_shared_memory("in", NBYTES)
        outputs = []
        for name, offset in (("y", 0), ("doubled", NBYTES)):
            output = (module.InferRequestedOutput(name, binary_data=True) if kind in HTTP
                      else module.InferRequestedOutput(name))
            output.set_shared_memory("out", NBYTES, offset=offset)
            outputs.append(output)
        await _do(client, "infer", "add", [tensor], outputs=outputs)
        written = [shm.get_contents_as_numpy(handles["out"], np.float32, [2, 4],
                                             offset=offset).tolist()
                   for offset in (0, NBYTES)]
        await _do(client, "unregister_system_shared_memory", "in")
        await _do(client, "unregister_system_shared_memory")  # all that are left
        left = _names(await _do(client, "get_system_shared_memory_status", **as_json), kind)
    finally:
        closed = client.close()
        if inspect.isawaitable(closed):
            await closed
        for handle in handles.values():
            shm.destroy_shared_memory_region(handle)
    return written, listed, left


@pytest.mark.parametrize("kind", KINDS)
def test_system_shared_memory_round_trip_as_triton(
    modelgate: Server, triton: Server, kind: str,
) -> None:
    ours = asyncio.run(_round_trip(modelgate, kind))
    assert ours == ([(X + 1).tolist(), (X * 2).tolist()], ["in", "out"], [])
    assert ours == asyncio.run(_round_trip(triton, kind))
