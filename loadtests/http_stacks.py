"""Compares HTTP/1.1 server stacks for the REST adapter on the binary infer path: each
candidate serves the same handler (a Triton binary-tensor request through a tiny ONNX model)
on uvloop, and h2load --h1 drives it over keep-alive connections on loopback.

    python -m loadtests.http_stacks [--requests N] [--stacks httptools,uvicorn,...]

Candidates: httptools (a protocol on uvloop with the httptools parser, what gateway/http/
serves on), uvicorn (minimal ASGI app, httptools parser), aiohttp (low-level server),
granian (Rust server, ASGI and RSGI interfaces, one worker)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import numpy as np

STACKS: Final = ("httptools", "uvicorn", "aiohttp", "granian-asgi", "granian-rsgi")
PATH: Final = "/v2/models/tiny/infer"
_WIDTH: Final = 16


def _session() -> Any:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, _WIDTH])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, _WIDTH])
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph([helper.make_node("Add", ["x", "one"], ["y"])], "tiny", [x], [y],
                              [one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options)


def request_body() -> tuple[bytes, int]:
    """A binary-tensor infer request (what tritonclient.http sends) and its JSON length."""
    header = json.dumps({
        "inputs": [{"name": "x", "shape": [1, _WIDTH], "datatype": "FP32",
                    "parameters": {"binary_data_size": _WIDTH * 4}}],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
    }).encode()
    return header + np.arange(_WIDTH, dtype=np.float32).tobytes(), len(header)


def make_handler() -> Callable[[bytes, int], tuple[bytes, int]]:
    """The shared work: parse the JSON header, view the binary input, run, encode."""
    session = _session()

    def handle(body: bytes, header_length: int) -> tuple[bytes, int]:
        header = json.loads(body[:header_length])
        spec = header["inputs"][0]
        array = np.frombuffer(body, np.float32, offset=header_length).reshape(spec["shape"])
        (out,) = session.run(None, {"x": array})
        raw = out.tobytes()
        head = json.dumps({"model_name": "tiny", "model_version": "1", "outputs": [
            {"name": "y", "datatype": "FP32", "shape": list(out.shape),
             "parameters": {"binary_data_size": len(raw)}}]}).encode()
        return head + raw, len(head)

    return handle


# -- the candidates -----------------------------------------------------------------------


def serve_httptools(port: int) -> None:
    import asyncio

    import httptools
    import uvloop

    handle = make_handler()

    class Protocol(asyncio.Protocol):
        def __init__(self) -> None:
            self.parser = httptools.HttpRequestParser(self)
            self.body: list[bytes] = []
            self.headers: dict[bytes, bytes] = {}

        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers[name.lower()] = value

        def on_body(self, body: bytes) -> None:
            self.body.append(body)

        def on_message_complete(self) -> None:
            length = int(self.headers[b"inference-header-content-length"])
            out, head = handle(b"".join(self.body), length)
            self.body, self.headers = [], {}
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                b"Inference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n%s"
                % (head, len(out), out)
            )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Protocol, "127.0.0.1", port, reuse_port=True)
        await server.serve_forever()

    uvloop.run(main())


async def _asgi_app(scope: Any, receive: Any, send: Any) -> None:
    handle = _HANDLER[0]
    if scope["type"] != "http":
        return
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    length = next(int(v) for k, v in scope["headers"] if k == b"inference-header-content-length")
    out, head = handle(b"".join(chunks), length)
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"application/octet-stream"),
        (b"inference-header-content-length", str(head).encode()),
        (b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})


_HANDLER: list[Callable[[bytes, int], tuple[bytes, int]]] = []


class _Rsgi:
    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        body = await proto()
        length = int(scope.headers.get("inference-header-content-length"))
        out, head = _HANDLER[0](body, length)
        proto.response_bytes(200, [("content-type", "application/octet-stream"),
                                   ("inference-header-content-length", str(head))], out)


def _asgi_factory() -> Any:
    if not _HANDLER:
        _HANDLER.append(make_handler())
    return _asgi_app


def _rsgi_factory() -> Any:
    if not _HANDLER:
        _HANDLER.append(make_handler())
    return _Rsgi()


def serve_uvicorn(port: int) -> None:
    import uvicorn

    _HANDLER.append(make_handler())
    uvicorn.run(_asgi_app, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                lifespan="off", access_log=False, log_level="warning")


def serve_aiohttp(port: int) -> None:
    import asyncio

    import uvloop
    from aiohttp import web

    handle = make_handler()

    async def infer(request: web.Request) -> web.Response:
        body = await request.read()
        out, head = handle(body, int(request.headers["Inference-Header-Content-Length"]))
        return web.Response(body=out, content_type="application/octet-stream",
                            headers={"Inference-Header-Content-Length": str(head)})

    async def main() -> None:
        app = web.Application()
        app.router.add_post(PATH, infer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, reuse_port=True).start()
        await asyncio.Event().wait()

    uvloop.run(main())


def _granian_command(interface: str, port: int) -> list[str]:
    factory = "_asgi_factory" if interface == "asgi" else "_rsgi_factory"
    return [str(Path(sys.executable).parent / "granian"), "--interface", interface,
            "--factory", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--loop", "uvloop", "--log-level", "warning", "--no-ws",
            f"loadtests.http_stacks:{factory}"]


# -- the driver ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not listen in time")


_FINISHED = re.compile(r"finished in [\d.]+m?s, ([\d.]+) req/s")
_LATENCY = re.compile(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+"
                      r"([\d.]+)(us|ms|s)")
_OK = re.compile(r"status codes: (\d+) 2xx")
_SCALE: Final = {"us": 1.0, "ms": 1e3, "s": 1e6}


def h2load(port: int, body: Path, header_length: int, clients: int, requests: int
           ) -> dict[str, float]:
    command = ["h2load", "--h1", "-n", str(requests), "-c", str(clients), "-m", "1",
               "-d", str(body), "-H", "content-type: application/octet-stream",
               "-H", f"inference-header-content-length: {header_length}",
               f"http://127.0.0.1:{port}{PATH}"]
    text = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          check=True).stdout
    finished, latency, ok = _FINISHED.search(text), _LATENCY.search(text), _OK.search(text)
    if finished is None or latency is None or ok is None:
        raise RuntimeError(f"unexpected h2load output:\n{text}")
    if int(ok.group(1)) != requests:
        raise RuntimeError(f"only {ok.group(1)} of {requests} answers were 2xx:\n{text}")
    mean_us = float(latency.group(5)) * _SCALE[latency.group(6)]
    return {"req_per_s": float(finished.group(1)), "mean_latency_us": mean_us}


def measure(stack: str, requests: int) -> dict[str, Any]:
    port = _free_port()
    if stack.startswith("granian"):
        command = _granian_command(stack.split("-")[1], port)
    else:
        command = [sys.executable, "-m", "loadtests.http_stacks", "--serve", stack,
                   "--port", str(port)]
    process = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        _wait_listening(port, process)
        body, header_length = request_body()
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "body"
            path.write_bytes(body)
            h2load(port, path, header_length, 1, 500)  # warm-up
            one = h2load(port, path, header_length, 1, requests)
            many = h2load(port, path, header_length, 32, requests * 2)
        return {"stack": stack, "c1_mean_latency_us": round(one["mean_latency_us"], 1),
                "c1_req_per_s": one["req_per_s"], "c32_req_per_s": many["req_per_s"]}
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


SERVERS: Final[dict[str, Callable[[int], None]]] = {
    "httptools": serve_httptools, "uvicorn": serve_uvicorn, "aiohttp": serve_aiohttp,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--stacks", default=",".join(STACKS))
    parser.add_argument("--serve", choices=sorted(SERVERS), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        SERVERS[args.serve](args.port)
        return 0
    if shutil.which("h2load") is None:
        print("h2load is not installed (nghttp2-client)", file=sys.stderr)
        return 2
    for stack in args.stacks.split(","):
        print(json.dumps(measure(stack, args.requests)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
