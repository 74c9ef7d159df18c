"""The forwarding comparison: the no-op proxy passes a real tritonserver's answers through
byte for byte, and one short real run (Triton, the proxy, the gateway in front of the same
tritonserver, h2load) reports every path and level and both targets. Needs h2load and the
Triton install; no figure's size is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from loadtests import forwarding
from loadtests.noop_proxy import start_noop_proxy
from loadtests.peer_models import peer_models, write_triton_repository
from loadtests.requests import answered_request
from loadtests.servers import free_port
from loadtests.versus import triton
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(600)


def test_the_proxy_passes_answers_and_errors_through(tmp_path: Path) -> None:
    repository = write_triton_repository(tmp_path / "repo", peer_models())
    with triton(repository, tmp_path) as (upstream, _):
        request = answered_request(upstream, forwarding.MODEL)
        with grpc.insecure_channel(upstream) as channel:
            direct = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        with start_noop_proxy(free_port(), upstream) as proxy, \
                grpc.insecure_channel(proxy.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ModelInfer(request, timeout=30) == direct
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(pb.ModelInferRequest(model_name="no-such-model"), timeout=30)
            assert caught.value.code() != grpc.StatusCode.OK
            assert "no-such-model" in (caught.value.details() or "")


def test_a_short_run_reports_every_path_and_both_targets(tmp_path: Path) -> None:
    out = tmp_path / "forwarding.json"
    assert forwarding.main(["--duration", "1", "--warmup", "0", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    seen = {(r["path"], r["level"]) for r in report["rows"]}
    paths = (forwarding.TRITON, forwarding.PROXY, forwarding.GATEWAY)
    assert seen == {(p, level) for p in paths for level in forwarding.LEVELS}
    for row in report["rows"]:
        assert row["answers_per_s"] > 0 and row["mean_us"] > 0
        assert (row["cpu_us"] > 0) == (row["path"] != forwarding.TRITON)
    at = {(r["path"], r["level"]): r for r in report["rows"]}
    added = at[forwarding.GATEWAY, "c=1"]["mean_us"] - at[forwarding.TRITON, "c=1"]["mean_us"]
    ratio = at[forwarding.GATEWAY, "c=32"]["cpu_us"] / at[forwarding.PROXY, "c=32"]["cpu_us"]
    assert [t["met"] for t in report["targets"]] == [added <= forwarding.ADDED_US,
                                                      ratio <= forwarding.CPU_RATIO]
    assert report["machine"]["command"].startswith(".venv/bin/python -m loadtests.forwarding")
