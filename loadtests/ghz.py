"""Writes ghz configs (JSON) for the V2 ModelInfer call of a served model, with data built
from its metadata, so `ghz --config FILE` drives the gateway (ghz finds the schema by reflection);
with --stream N, for ModelStreamInfer: each call is one stream carrying N messages.

    python -m loadtests.ghz --target 127.0.0.1:8001 --model digits --out loadtests/ghz/digits.json
    ghz --config loadtests/ghz/digits.json
    python -m loadtests.ghz --model digits --stream 16 --out loadtests/ghz/digits-stream.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from loadtests.requests import request_for, require_loopback
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc

CALL = "inference.GRPCInferenceService.ModelInfer"
STREAM_CALL = "inference.GRPCInferenceService.ModelStreamInfer"


def ghz_config(
    target: str,
    request: pb.ModelInferRequest,
    total: int = 20_000,
    concurrency: int = 32,
    api_key: str = "",
) -> dict[str, Any]:
    """A ghz config: bounded by total requests and a duration cap, loopback only."""
    config: dict[str, Any] = {
        "call": CALL,
        "host": require_loopback(target),
        "insecure": True,
        "total": total,
        "concurrency": concurrency,
        "connections": min(concurrency, 4),
        "timeout": "10s",
        "duration": "120s",
        "data": json_format.MessageToDict(request, preserving_proto_field_name=True),
    }
    if api_key:
        config["metadata"] = {"authorization": f"Bearer {api_key}"}
    return config


def ghz_stream_config(
    target: str,
    request: pb.ModelInferRequest,
    messages: int,
    *,
    total: int = 2_000,
    concurrency: int = 32,
    api_key: str = "",
) -> dict[str, Any]:
    """A ghz config for ModelStreamInfer: ``total`` streams (``concurrency`` open at once),
    each sending ``messages`` requests (ids 0..n-1) and reading an answer for each. ghz
    counts a stream as one request: messages/s = its requests/s x ``messages``."""
    config = ghz_config(target, request, total, concurrency, api_key)
    bodies = []
    for index in range(messages):
        body = json_format.MessageToDict(request, preserving_proto_field_name=True)
        body["id"] = str(index)
        bodies.append(body)
    config.update({"call": STREAM_CALL, "data": bodies, "stream-call-count": messages,
                   "timeout": "30s"})
    return config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.ghz", description=__doc__)
    parser.add_argument("--target", default="127.0.0.1:8001")
    parser.add_argument("--model", required=True)
    parser.add_argument("--model-version", default="")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--total", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--api-key", default="")
    parser.add_argument("--stream", type=int, default=0, metavar="N",
                        help="ModelStreamInfer with N messages per stream (0: unary ModelInfer)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    with grpc.insecure_channel(require_loopback(args.target)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else []
        described = stub.ModelMetadata(
            pb.ModelMetadataRequest(name=args.model), metadata=metadata, timeout=10
        )
    request = request_for(described, batch=args.batch, version=args.model_version)
    if args.stream < 0 or args.stream > 10_000:
        parser.error("--stream must lie in 0..10000")
    config = (ghz_stream_config(args.target, request, args.stream, total=args.total,
                                concurrency=args.concurrency, api_key=args.api_key)
              if args.stream
              else ghz_config(args.target, request, args.total, args.concurrency, args.api_key))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: ghz --config {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
