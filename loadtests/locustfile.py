"""Locust users for the V2 gRPC protocol: V2User calls ModelInfer on one model with inputs
built from its metadata, sending a tenant key, version or label; StreamUser keeps one
ModelStreamInfer stream with --in-flight messages outstanding. Bounded and loopback-only.

    locust -f loadtests/locustfile.py --headless -u 32 -r 8 --run-time 30s \
        --host 127.0.0.1:8001 --model digits --batch 1 [--api-key mg_...] [--model-version 2]
    locust -f loadtests/locustfile.py StreamUser --headless -u 4 -r 4 --run-time 30s \
        --host 127.0.0.1:8001 --model digits --in-flight 16
"""

from __future__ import annotations

import time
from typing import Any

import gevent
import gevent.lock
import gevent.queue
import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, events, task
from locust.env import Environment

from loadtests.requests import request_for, require_loopback
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc

# gRPC's own threads must cooperate with gevent's event loop, or every call blocks a worker.
grpc_gevent.init_gevent()

DEFAULT_RUN_TIME_S = 60


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--model", default="digits", help="model to call")
    parser.add_argument("--model-version", default="", help="version number or label")
    parser.add_argument("--batch", type=int, default=1, help="rows per request")
    parser.add_argument("--api-key", default="", env_var="MODELGATE_API_KEY",
                        help="tenant API key (sent as authorization: Bearer)")
    parser.add_argument("--routing-key", default="", help="x-routing-key for sticky canaries")
    parser.add_argument("--max-requests", type=int, default=100_000,
                        help="stop after this many requests in total")
    parser.add_argument("--in-flight", type=int, default=16,
                        help="StreamUser: messages outstanding on each user's stream")


@events.test_start.add_listener
def _bound_the_run(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    require_loopback(environment.host or "127.0.0.1:8001")
    # Never run unbounded: without --run-time, stop after DEFAULT_RUN_TIME_S.
    if options is not None and not options.run_time and environment.runner is not None:
        runner = environment.runner
        gevent.spawn_later(DEFAULT_RUN_TIME_S, runner.quit)


class V2User(User):
    """One client connection calling ModelInfer in a closed loop."""

    host = "127.0.0.1:8001"

    def on_start(self) -> None:
        self.connect()

    def connect(self) -> None:
        options = self.environment.parsed_options
        self.model = options.model if options else "digits"
        self.channel = grpc.insecure_channel(require_loopback(self.host or "127.0.0.1:8001"))
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.metadata: list[tuple[str, str]] = []
        if options is not None and options.api_key:
            self.metadata.append(("authorization", f"Bearer {options.api_key}"))
        if options is not None and options.routing_key:
            self.metadata.append(("x-routing-key", options.routing_key))
        described = self.stub.ModelMetadata(
            pb.ModelMetadataRequest(name=self.model), metadata=self.metadata, timeout=10
        )
        self.request = request_for(
            described,
            batch=options.batch if options else 1,
            version=options.model_version if options else "",
        )
        self.limit = options.max_requests if options else 100_000

    def on_stop(self) -> None:
        self.channel.close()

    def limit_reached(self) -> bool:
        """Whether the run has made --max-requests requests; if so, it is told to stop."""
        runner = self.environment.runner
        if self.environment.stats.total.num_requests < self.limit or runner is None:
            return False
        runner.quit()
        return True

    @task
    def infer(self) -> None:
        if self.limit_reached():
            return
        started = time.perf_counter()
        error: Exception | None = None
        size = 0
        try:
            response = self.stub.ModelInfer(self.request, metadata=self.metadata, timeout=30)
            size = response.ByteSize()
        except grpc.RpcError as exc:
            error = exc
        events.request.fire(
            request_type="grpc",
            name=f"ModelInfer {self.model}",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=size,
            exception=error,
            context={},
        )


class StreamUser(V2User):
    """One connection holding one ModelStreamInfer stream with ``--in-flight`` messages
    outstanding: a message goes out as an answer comes back. One locust request per
    message, timed send to answer (matched by id)."""

    def on_start(self) -> None:
        self.connect()
        options = self.environment.parsed_options
        in_flight = max(1, options.in_flight if options else 16)
        self.places = gevent.lock.Semaphore(in_flight)
        self.outgoing: gevent.queue.Queue[pb.ModelInferRequest | None] = gevent.queue.Queue()
        self.sent: dict[str, float] = {}
        self.counter = 0
        answers = self.stub.ModelStreamInfer(iter(self.outgoing.get, None),
                                             metadata=self.metadata, timeout=3600)
        self.reader = gevent.spawn(self._read, answers)

    def _read(self, answers: Any) -> None:
        try:
            for answer in answers:
                began = self.sent.pop(answer.infer_response.id, None)
                self.places.release()
                if began is None:
                    continue
                error = Exception(answer.error_message) if answer.error_message else None
                events.request.fire(
                    request_type="grpc-stream", name=f"ModelStreamInfer {self.model}",
                    response_time=(time.perf_counter() - began) * 1000,
                    response_length=answer.ByteSize(), exception=error, context={})
        except grpc.RpcError as exc:
            events.request.fire(request_type="grpc-stream", name="stream ended",
                                response_time=0, response_length=0, exception=exc, context={})

    def on_stop(self) -> None:
        self.outgoing.put(None)  # half-close: the gateway answers what is in flight
        self.reader.join(timeout=30)
        super().on_stop()

    @task
    def infer(self) -> None:
        if self.limit_reached():
            return
        self.places.acquire()
        message = pb.ModelInferRequest()
        message.CopyFrom(self.request)
        message.id = str(self.counter)
        self.counter += 1
        self.sent[message.id] = time.perf_counter()
        self.outgoing.put(message)
