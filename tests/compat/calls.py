"""The calls of the compatibility suite: every server-facing public method of tritonclient's
four clients (grpc, grpc.aio, http, http.aio), each with a success and an error case, and
how to make one against a server (by kind of client) and reduce its answer to what two
servers must agree on. A case's id names the Triton protocol extension that documents the
behaviour, where one does (docs/protocol/extension_*.md in Triton's server repository)."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Final

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from tritonclient.utils import InferenceServerException

MODULES: Final[dict[str, ModuleType]] = {
    "grpc": grpcclient, "grpc.aio": grpcaio, "http": httpclient, "http.aio": httpaio,
}
KINDS: Final = tuple(MODULES)
GRPC: Final = frozenset({"grpc", "grpc.aio"})
HTTP: Final = frozenset({"http", "http.aio"})
EVERY: Final = GRPC | HTTP

# Methods that never reach a server (plugins, closing, request encoding): nothing to test.
CLIENT_SIDE: Final = frozenset({
    "close", "plugin", "register_plugin", "unregister_plugin", "generate_request_body",
    "parse_response_body",
})
# Stream methods: tests/compat/test_streams.py.
STREAMS: Final = frozenset({"start_stream", "stop_stream", "async_stream_infer", "stream_infer"})

Build = Callable[[ModuleType, str], tuple[tuple[Any, ...], dict[str, Any]]]


@dataclass(frozen=True)
class Outcome:
    """What a call gave: its answer, or the error's status (gRPC code name, HTTP status)."""

    answer: Any = None
    status: str | None = None
    message: str = ""

    @property
    def failed(self) -> bool:
        return self.status is not None


@dataclass(frozen=True)
class Case:
    """One call: ``method`` with the arguments ``build`` makes for a client module, made by
    the client ``kinds``. ``error``: it must fail (``status`` maps a kind, 'grpc' or 'http',
    to the status modelgate answers). ``project`` reduces a successful answer to what
    modelgate and Triton must agree on (None: not compared, ``why`` says why); ``check``
    asserts what modelgate's own answer must hold."""

    id: str
    method: str
    build: Build = field(default=lambda module, kind: ((), {}))
    kinds: frozenset[str] = EVERY
    error: bool = False
    status: dict[str, str] = field(default_factory=dict)
    project: Callable[[Any, str], Any] | None = None
    check: Callable[[Any, str], None] | None = None
    why: str = ""


def _args(*args: Any, **kwargs: Any) -> Build:
    """Fixed arguments, the same for every client."""
    return lambda module, kind: (args, kwargs)


def _json(*args: Any, **kwargs: Any) -> Build:
    """Fixed arguments, with as_json=True for the gRPC clients (answers as dicts)."""
    return lambda module, kind: (args, {**kwargs, "as_json": True} if kind in GRPC else kwargs)


def _url(server: Any, kind: str) -> str:
    return str(server.grpc if kind in GRPC else server.http)


def call(server: Any, kind: str, case: Case) -> Outcome:
    """Make ``case``'s call with a fresh client of ``kind``; the outcome."""
    module = MODULES[kind]
    args, kwargs = case.build(module, kind)
    url = _url(server, kind)
    try:
        if kind.endswith(".aio"):
            answer = asyncio.run(_call_aio(module, url, case.method, args, kwargs))
        else:
            client = module.InferenceServerClient(url)
            try:
                if case.method == "async_infer":
                    answer = _async_infer(client, kind, args, kwargs)
                else:
                    answer = getattr(client, case.method)(*args, **kwargs)
            finally:
                client.close()
    except InferenceServerException as exc:
        return Outcome(status=str(exc.status()), message=str(exc.message()))
    return Outcome(answer=answer)


async def _call_aio(module: ModuleType, url: str, method: str, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
    client = module.InferenceServerClient(url)
    try:
        return await getattr(client, method)(*args, **kwargs)
    finally:
        await client.close()


def _async_infer(client: Any, kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]
                 ) -> Any:
    """async_infer's result: http's handle gives it, grpc's callback receives it."""
    if kind == "http":
        return client.async_infer(*args, **kwargs).get_result()
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.async_infer(*args, callback=lambda result, error: answers.put((result, error)),
                       **kwargs)
    result, error = answers.get(timeout=60)
    if error is not None:
        raise error
    return result


# -- inference ----------------------------------------------------------------------------

X: Final = np.arange(8, dtype=np.float32).reshape(2, 4)


def _add_inputs(module: ModuleType, kind: str, binary: bool = True,
                data: np.ndarray = X) -> list[Any]:
    tensor = module.InferInput("x", list(data.shape), "FP32")
    if kind in HTTP:
        tensor.set_data_from_numpy(data, binary_data=binary)
    else:
        tensor.set_data_from_numpy(data)
    return [tensor]


def _infer(binary: bool = True, model: str = "add", data: np.ndarray = X,
           class_count: int = 0, compression: str | None = None, **kwargs: Any) -> Build:
    """An inference of ``model``; ``outputs`` names those asked for (each with
    ``class_count``), ``compression`` compresses both ways where the client can."""
    def build(module: ModuleType, kind: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
        extra = dict(kwargs)
        outputs = extra.pop("outputs", None)
        if outputs is not None:
            extra["outputs"] = [
                module.InferRequestedOutput(name, binary_data=binary, class_count=class_count)
                if kind in HTTP else module.InferRequestedOutput(name, class_count=class_count)
                for name in outputs]
        if compression is not None and kind in HTTP:
            extra["request_compression_algorithm"] = compression
            extra["response_compression_algorithm"] = compression
        elif compression is not None:
            extra["compression_algorithm"] = compression
        return (model, _add_inputs(module, kind, binary, data)), extra
    return build


ALL_TYPES: Final = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                    "INT64", "FP16", "FP32", "FP64", "BYTES")


def _sample(datatype: str) -> np.ndarray:
    if datatype == "BYTES":
        return np.array([[f"r{r}c{c}".encode() for c in range(3)] for r in range(2)],
                        dtype=np.object_)
    if datatype == "BOOL":
        return np.array([[True, False, True]] * 2)
    dtypes = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
    return (np.arange(6) + 1).reshape(2, 3).astype(dtypes.get(datatype, datatype.lower()))


def _all_types(binary: bool) -> Build:
    def build(module: ModuleType, kind: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
        inputs = []
        for datatype in ALL_TYPES:
            tensor = module.InferInput(f"in_{datatype}", [2, 3], datatype)
            if kind in HTTP:
                tensor.set_data_from_numpy(_sample(datatype), binary_data=binary)
            else:
                tensor.set_data_from_numpy(_sample(datatype))
            inputs.append(tensor)
        return ("all_types", inputs), {}
    return build


def outputs_of(result: Any, kind: str) -> dict[str, Any]:
    """An InferResult's outputs by name, as lists (comparable across servers)."""
    response = result.get_response(as_json=True) if kind in GRPC else result.get_response()
    names = [o["name"] for o in response.get("outputs", [])]
    return {name: result.as_numpy(name).tolist() for name in sorted(names)}


def _outputs(result: Any, kind: str) -> Any:
    return outputs_of(result, kind)


def _id_and_outputs(result: Any, kind: str) -> Any:
    response = result.get_response(as_json=True) if kind in GRPC else result.get_response()
    return response.get("id"), outputs_of(result, kind)


# -- projections ---------------------------------------------------------------------------

def _same(answer: Any, kind: str) -> Any:
    return answer


def _tensors(answer: dict[str, Any], kind: str) -> Any:
    def shape(t: dict[str, Any]) -> list[int]:
        return [int(d) for d in t["shape"]]
    return {part: [(t["name"], t["datatype"], shape(t)) for t in answer[part]]
            for part in ("inputs", "outputs")}


def _config(answer: dict[str, Any], kind: str) -> Any:
    config = answer["config"] if kind in GRPC else answer
    return (config["name"], config.get("max_batch_size", 0),
            [(t["name"], t["data_type"], t["dims"]) for t in config["input"]],
            [(t["name"], t["data_type"], t["dims"]) for t in config["output"]])


def _index(answer: Any, kind: str) -> Any:
    rows = answer.get("models", []) if kind in GRPC else answer
    return sorted((r["name"], r.get("version", ""), r.get("state", "")) for r in rows)


def _statistics(answer: dict[str, Any], kind: str) -> Any:
    return sorted((s["name"], s["version"]) for s in answer.get("model_stats", []))


def _setting_names(answer: dict[str, Any], kind: str) -> Any:
    settings = answer.get("settings", answer) if kind in GRPC else answer
    return sorted(settings)


def _keys(answer: dict[str, Any], kind: str) -> Any:
    return sorted(answer)


def settings_of(answer: dict[str, Any], kind: str) -> dict[str, Any]:
    """A trace or log settings answer as {name: value} (gRPC's SettingValue unwrapped)."""
    if kind in HTTP:
        return answer
    out: dict[str, Any] = {}
    for name, value in answer.get("settings", {}).items():
        if "value" in value:
            out[name] = value["value"]
        else:
            out[name] = next(iter(value.values()), None)
    return out
