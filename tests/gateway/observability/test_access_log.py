"""The JSON access log: one line per request from a real gateway, the fields it promises,
nothing secret, and no way for a client-chosen value to break or forge a line."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest

from gateway.observability.access_log import MAX_FIELD, AccessEntry, format_entry
from modelgate_pb import grpc_service_pb2 as pb
from tests.support.gateway import running_gateway
from tests.support.models import add_constant, add_model_config, write_model

SECRET = "mg_live_secret_key_0123456789"
MARKER = 1234.5  # a tensor value that must never appear in the log


def infer_request(model: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    request.raw_input_contents.append(np.full((2, 4), MARKER, np.float32).tobytes())
    return request


def test_one_line_per_request_with_its_fields(tmp_path: Path) -> None:
    write_model(tmp_path / "store", "plain", 1, add_constant(1.0), add_model_config("plain"))
    log_path = tmp_path / "logs" / "access.jsonl"
    forged = 'evil\r\n{"code":"OK","forged":true}\x1b[2J\u2028'
    with running_gateway(tmp_path / "store", access_log=str(log_path)) as gw:
        stub = gw.stub()
        stub.ModelInfer(infer_request("plain"), metadata=(("authorization", f"Bearer {SECRET}"),))
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(infer_request(forged))
    text = log_path.read_text(encoding="utf-8")  # the gateway's stop flushed it
    lines = text.splitlines()
    assert len(lines) == 2
    ok, failed = (json.loads(line) for line in lines)
    assert ok["method"] == "ModelInfer"
    assert ok["code"] == "OK"
    assert ok["tenant"] == "anonymous"
    assert (ok["model"], ok["version"], ok["rows"], ok["batch_rows"]) == ("plain", "1", 2, 2)
    assert ok["peer"].startswith("ipv4:127.0.0.1:")
    assert isinstance(ok["queue_us"], int) and isinstance(ok["compute_us"], int)
    assert ok["total_us"] >= ok["queue_us"]
    assert ok["trace_id"] is None  # tracing is off
    assert ok["time"].endswith("Z")
    assert failed["code"] == "NOT_FOUND"
    assert failed["model"] == forged  # kept, but escaped: it could not break the line
    assert failed["rows"] is None and failed["queue_us"] is None
    assert SECRET not in text and "authorization" not in text.lower()
    assert str(MARKER) not in text and "1234" not in text
    assert all(ch.isprintable() for ch in text.replace("\n", ""))


def test_format_escapes_control_characters_and_cuts_long_fields() -> None:
    entry = AccessEntry(
        method="ModelInfer", code="OK", peer="ipv4:1.2.3.4:5\n",
        model="a\rb\nc\td\x00e\x7f\u2028", tenant="x" * (MAX_FIELD + 50),
    )
    line = format_entry(entry, now=0.0)
    assert "\n" not in line and "\r" not in line
    assert all(32 <= ord(ch) < 127 for ch in line)
    record = json.loads(line)
    assert record["model"] == "a\rb\nc\td\x00e\x7f\u2028"
    assert len(record["tenant"]) == MAX_FIELD
    assert record["time"] == "1970-01-01T00:00:00.000Z"
