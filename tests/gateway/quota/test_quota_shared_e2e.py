"""``modelgate serve --workers 2`` with a tenants file and no Redis: both workers enforce one
request budget between them, whichever worker each connection reached, and the supervisor
removes the shared quota table when it stops."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelgate_pb import grpc_service_pb2_grpc as pb_grpc
from tests.gateway.process.test_workers import _scrape, _workers
from tests.gateway.quota.test_quota_e2e import call, request, tenants
from tests.support import models
from tests.support.gateway import GatewayProcess
from tests.support.sockets import ESTABLISHED, LISTEN, tcp_sockets
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(240)

# Worker processes import the whole gateway each; give them a minute on a loaded machine.
_wait_for = functools.partial(wait_until, timeout=60)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    models.write_model(root, "add", 1, models.add_constant(1.0),
                       models.add_model_config("add", max_batch_size=64))
    return root


def _accepted_by(pids: list[int], port: int) -> set[int]:
    """The workers holding the server side of one of this process's connections."""
    mine = {s.local_port for s in tcp_sockets() if s.remote_port == port
            and s.state == ESTABLISHED}
    return {pid for pid in pids if any(
        s.local_port == port and s.remote_port in mine and s.state == ESTABLISHED
        for s in tcp_sockets(pid)
    )}


def _metrics_port(pid: int, grpc_port: int) -> int:
    """A worker's own metrics endpoint: its listening socket that is not the gRPC port."""
    ports = {s.local_port for s in tcp_sockets(pid) if s.state == LISTEN} - {grpc_port}
    assert len(ports) == 1, ports
    return ports.pop()


def _tenant_requests(port: int, tenant: str) -> dict[str, float]:
    """modelgate_tenant_requests_total of one worker, by status code."""
    status, text = _scrape(port)
    assert status == 200
    return {
        sample.labels["code"]: sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
        if sample.name == "modelgate_tenant_requests_total"
        and sample.labels.get("tenant") == tenant
    }


def test_two_workers_admit_one_burst_between_them(store: Path, tmp_path: Path) -> None:
    burst = 24
    path = tmp_path / "tenants.toml"
    # One token per 1000 s: only the burst can pass while the test runs.
    keys = tenants(path, ("pair", ["--requests-per-s", "0.001", "--burst", str(burst)]))
    args = ["--workers", "2", "--store", str(store), "--tenants", str(path)]
    with GatewayProcess(args) as gw:
        _wait_for(lambda: gw.log().count("modelgate serving") >= 2)
        workers = _workers(gw)
        assert len(workers) == 2, gw.log()
        found = re.search(r"workers share quotas through (\S+)", gw.log())
        assert found, gw.log()
        table = Path(found[1])
        assert table.exists()
        channels: list[grpc.Channel] = []
        try:
            # Channels of their own (no shared subchannel), opened until the kernel has
            # handed connections to both workers; each is used in turn below.
            while len(channels) < 4 or _accepted_by(workers, gw.port) != set(workers):
                assert len(channels) < burst, "every connection went to one worker"
                channel = grpc.insecure_channel(
                    gw.target, options=[("grpc.use_local_subchannel_pool", 1)]
                )
                grpc.channel_ready_future(channel).result(timeout=30)
                channels.append(channel)
            stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]
            codes = [call(stubs[i % len(stubs)], keys["pair"], request())[0]
                     for i in range(3 * burst)]
        finally:
            for channel in channels:
                channel.close()
        # Sequential calls: the first ``burst`` pass, wherever they went; then none.
        ok, exhausted = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED
        assert codes == [ok] * burst + [exhausted] * (2 * burst)
        ports = {pid: _metrics_port(pid, gw.port) for pid in workers}

        def per_worker() -> dict[int, dict[str, float]]:
            return {pid: _tenant_requests(port, "pair") for pid, port in ports.items()}

        _wait_for(lambda: sum(c.get("RESOURCE_EXHAUSTED", 0) + c.get("OK", 0)
                              for c in per_worker().values()) == 3 * burst)
        counts = per_worker()
        print("requests per worker:", counts)
        # Both workers admitted part of the one burst: neither had a bucket of its own.
        assert all(c.get("OK", 0) > 0 for c in counts.values()), counts
        assert sum(c.get("OK", 0) for c in counts.values()) == burst
        assert gw.stop() == 0, gw.log()
    assert not table.exists()
