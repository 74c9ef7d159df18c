"""Waiting, bounded, for a condition the system under test reaches on its own: polling with
a give-up time that raises, never an assertion about how fast something happened."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import subprocess
import time
from collections.abc import Callable

import grpc

from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc


def wait_until(
    predicate: Callable[[], object],
    what: str = "condition",
    timeout: float = 30.0,
    interval: float = 0.02,
) -> None:
    """Return once ``predicate()`` is true; raise TimeoutError after ``timeout`` seconds."""
    give_up = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= give_up:
            raise TimeoutError(f"{what} not reached within {timeout:g} s")
        time.sleep(interval)


async def until(
    predicate: Callable[[], object],
    what: str = "condition",
    limit_s: float = 30.0,
    interval: float = 0.005,
) -> None:
    """``wait_until`` for a coroutine: the event loop keeps running while it polls, so the
    tasks that make ``predicate()`` true get their turns. The predicate may be a coroutine
    function (a check that asks a server)."""
    give_up = time.monotonic() + limit_s
    while not await _holds(predicate):
        if time.monotonic() >= give_up:
            raise TimeoutError(f"{what} not reached within {limit_s:g} s")
        await asyncio.sleep(interval)


async def _holds(predicate: Callable[[], object]) -> object:
    result = predicate()
    return await result if inspect.isawaitable(result) else result


def wait_server_ready(
    target: str, process: subprocess.Popen[bytes] | None, name: str,
    log: Callable[[], str], timeout: float,
) -> None:
    """Wait until the gRPC server at ``target`` says ServerReady; raise with its ``log`` as
    soon as its ``process`` exits, or when ``timeout`` seconds pass."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def ready() -> bool:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{name} exited {process.returncode}:\n{log()}")
            with contextlib.suppress(grpc.RpcError):
                return bool(stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready)
            return False

        try:
            wait_until(ready, f"{name} ready", timeout, interval=0.1)
        except TimeoutError as exc:
            raise TimeoutError(f"{name} not ready after {timeout:g}s:\n{log()}") from exc
