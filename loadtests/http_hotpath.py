"""The REST port's own request path, measured without sockets: request bytes are fed to the
real HttpConnection (httptools parsing, the edge, the pipeline, the response head) over an
in-memory transport by closed-loop callers; prints the loop thread's CPU time per request
(robust to a busy machine, unlike throughput) and, with --profile, a cProfile of it.

    .venv/bin/python -m loadtests.http_hotpath --model cnn --body json --concurrency 1
"""

from __future__ import annotations

import asyncio
import cProfile
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from gateway.http.connection import Connections, HttpConnection, Limits
from gateway.process import event_loop
from gateway.process.server import Gateway
from gateway.settings import Settings, demo_store
from loadtests import loop_cpu
from loadtests.http_bench import body as infer_body
from loadtests.loop_cpu import Round, timed_round


class _Transport:
    """The transport calls HttpConnection makes, in memory: a write completes the answer
    the caller waits for once Content-Length bytes of body have arrived."""

    def __init__(self) -> None:
        self.answer: asyncio.Future[bytes] | None = None
        self._buffer = bytearray()

    def write(self, data: bytes) -> None:
        self._buffer += data
        head_end = self._buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = bytes(self._buffer[:head_end]).lower()
        length = int(head.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        if len(self._buffer) >= head_end + 4 + length and self.answer is not None:
            answer, self.answer = self.answer, None
            answer.set_result(bytes(self._buffer))
            self._buffer.clear()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        pass


def request_bytes(model: str, binary: bool, key: str | None) -> bytes:
    """One keep-alive POST of the benchmark's body for ``model``."""
    data, header_length = infer_body(model, binary)
    lines = [f"POST /v2/models/{model}/infer HTTP/1.1", "Host: 127.0.0.1",
             "Content-Type: application/octet-stream", f"Content-Length: {len(data)}"]
    if header_length is not None:
        lines.append(f"Inference-Header-Content-Length: {header_length}")
    if key:
        lines.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


async def measure(settings: Settings, model: str, binary: bool, *, concurrency: int,
                  requests: int, rounds: int, key: str | None,
                  profile: cProfile.Profile | None) -> list[Round]:
    gateway = Gateway(settings)
    await gateway.start()
    try:
        assert gateway.rest is not None
        handler = gateway.rest.listener.handler
        wire = request_bytes(model, binary, key)
        limits = Limits(max_body_bytes=settings.max_message_bytes)
        loop = asyncio.get_running_loop()

        async def caller(count: int) -> None:
            transport = _Transport()
            connection = HttpConnection(handler, limits, Connections())
            connection.connection_made(transport)  # type: ignore[arg-type]
            for _ in range(count):
                transport.answer = loop.create_future()
                connection.data_received(wire)
                answer = await transport.answer
                if not answer.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(answer[:400].decode("latin-1"))
            connection.connection_lost(None)

        await caller(50)  # warm-up: plans, sessions, first batches
        return [await timed_round(caller, concurrency=concurrency, requests=requests,
                                  profile=profile) for _ in range(rounds)]
    finally:
        await gateway.stop(grace=0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = loop_cpu.parser("python -m loadtests.http_hotpath", __doc__,
                             model_help="digits, digits_unbatched or cnn",
                             concurrency=1, requests=5000)
    parser.add_argument("--body", default="binary", choices=("binary", "json"))
    args = parser.parse_args(argv)
    if min(args.concurrency, args.requests, args.rounds) < 1:
        parser.error("--concurrency, --requests and --rounds must be positive")
    settings = dataclasses.replace(
        Settings(), store=args.store or demo_store(), grpc_port=0, metrics_port=0,
        http_port=0, host="127.0.0.1", tenants=args.tenants, log_level="WARNING",
        monitoring=args.monitoring,
    )
    profile = cProfile.Profile() if args.profile else None
    rounds = event_loop.run(
        measure(settings, args.model, args.body == "binary", concurrency=args.concurrency,
                requests=args.requests, rounds=args.rounds, key=args.key, profile=profile),
        args.event_loop,
    )
    for result in rounds:
        print(result.line(f"{args.model} {args.body}", args.concurrency))
    loop_cpu.print_profile(profile, args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
