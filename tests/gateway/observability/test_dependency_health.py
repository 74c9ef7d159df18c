"""The dependency gauges, scraped from a real gateway's /metrics: modelgate_upstream_up follows
a real tritonserver stopped and started again; modelgate_redis_up and
modelgate_redis_fail_open follow a real redis-server stopped and started, in both failure
modes; workers' samples merge so that one worker's view of an outage shows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gateway.process.metrics_fanin import merge_expositions
from gateway.quota.redis_store import RedisQuotaStore
from tests.gateway.observability.test_metrics import Samples, infer_request, scrape, value
from tests.gateway.tenancy.test_tenants import admin, issue
from tests.support.gateway import free_port, running_gateway
from tests.support.models import add_constant, add_model_config, write_model
from tests.support.redis_server import RedisServer, fresh_redis
from tests.support.triton_server import triton_servers
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(240)

UP = "modelgate_upstream_up"
REDIS_UP = "modelgate_redis_up"
FAIL_OPEN = "modelgate_redis_fail_open"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    write_model(root, "add", 1, add_constant(1.0), add_model_config("add"))
    return root


def present(samples: Samples, name: str) -> set[frozenset[tuple[str, str]]]:
    return {labels for (sample, labels) in samples if sample == name}


def test_upstream_up_follows_a_tritonserver_stopped_and_started(store: Path) -> None:
    with triton_servers(2, ("add",)) as (a, b):
        dead = f"127.0.0.1:{free_port()}"  # c is declared but nothing listens there
        with running_gateway(store, triton=(f"a={a.target}", f"b={b.target}", f"c={dead}"),
                             triton_probe_interval_s=0.2) as gw:
            samples = scrape(gw)
            assert present(samples, UP) == {frozenset({("upstream", n)}) for n in "abc"}
            assert [value(samples, UP, upstream=n) for n in "abc"] == [1, 1, 0]
            a.stop()
            wait_until(lambda: value(scrape(gw), UP, upstream="a") == 0, "a to read down")
            assert value(scrape(gw), UP, upstream="b") == 1  # the other is unaffected
            a.start()  # same port; the gateway is not restarted
            wait_until(lambda: value(scrape(gw), UP, upstream="a") == 1, "a to read up")
            assert value(scrape(gw), UP, upstream="c") == 0


def test_without_redis_the_gauges_say_no_fail_open(store: Path) -> None:
    with running_gateway(store) as gw:
        samples = scrape(gw)
    assert value(samples, FAIL_OPEN) == 0 and (FAIL_OPEN, frozenset()) in samples
    assert present(samples, REDIS_UP) == set()  # no Redis, nothing to be up
    assert present(samples, UP) == set()  # no upstream declared


@pytest.fixture
def tenants(tmp_path: Path) -> tuple[Path, str]:
    """A tenants file with one limited tenant (every call is charged to the quota store)."""
    path = tmp_path / "tenants.toml"
    assert admin(path, "create", "t", "--requests-per-s", "1000", "--burst", "1000")[0] == 0
    return path, issue(path, "t")


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    yield from fresh_redis()


@pytest.mark.parametrize("mode", ["fail-open", "fail-closed"])
def test_redis_gauges_follow_a_redis_server_stopped_and_started(
    store: Path, tenants: tuple[Path, str], redis_server: RedisServer, mode: str
) -> None:
    path, key = tenants
    with running_gateway(store, tenants=path, redis_url=redis_server.url,
                         redis_failure_mode=mode) as gw:
        quota = gw.gateway.quota
        assert isinstance(quota, RedisQuotaStore)
        stub = gw.stub()

        def call() -> grpc.StatusCode:
            try:
                stub.ModelInfer(infer_request("add"), timeout=30,
                                metadata=(("authorization", f"Bearer {key}"),))
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        assert call() == grpc.StatusCode.OK
        samples = scrape(gw)
        assert (value(samples, REDIS_UP), value(samples, FAIL_OPEN)) == (1, 0)
        assert (REDIS_UP, frozenset()) in samples

        redis_server.stop()
        # The store finds the outage when a call (or a lease it holds) next needs Redis.
        codes: list[grpc.StatusCode] = []

        def outage_found() -> bool:
            codes.append(call())
            return not quota.available

        wait_until(outage_found, "the outage found")
        # Until then leased tokens admit; the call that found it is let through or refused.
        refused = grpc.StatusCode.OK if mode == "fail-open" else grpc.StatusCode.UNAVAILABLE
        assert set(codes[:-1]) <= {grpc.StatusCode.OK} and codes[-1] == refused
        samples = scrape(gw)
        assert value(samples, REDIS_UP) == 0
        if mode == "fail-open":
            assert value(samples, FAIL_OPEN) == 1
            assert call() == grpc.StatusCode.OK  # admitted under this process's limits
        else:
            assert value(samples, FAIL_OPEN) == 0
            assert call() == grpc.StatusCode.UNAVAILABLE  # refused, not let through
        assert value(samples, "modelgate_redis_outages_total") == 1

        redis_server.start()  # same port; the store's probe finds it without traffic
        wait_until(lambda: value(scrape(gw), REDIS_UP) == 1, "Redis to read up again")
        assert value(scrape(gw), FAIL_OPEN) == 0
        assert call() == grpc.StatusCode.OK


def test_workers_merge_so_one_workers_outage_shows() -> None:
    """With --workers the supervisor merges the workers' expositions: an upstream is up
    only while every worker finds it up, fail-open shows while any worker is in it."""
    def worker(up: int, redis_up: int, fail_open: int) -> str:
        return (
            "# TYPE modelgate_upstream_up gauge\n"
            f'modelgate_upstream_up{{upstream="a"}} {up}\n'
            "# TYPE modelgate_redis_up gauge\n"
            f"modelgate_redis_up {redis_up}\n"
            "# TYPE modelgate_redis_fail_open gauge\n"
            f"modelgate_redis_fail_open {fail_open}\n"
        )

    merged = merge_expositions([worker(1, 1, 0), worker(0, 0, 1), worker(1, 1, 0)]).decode()
    assert 'modelgate_upstream_up{upstream="a"} 0.0' in merged
    assert "modelgate_redis_up 0.0" in merged
    assert "modelgate_redis_fail_open 1.0" in merged
    merged = merge_expositions([worker(1, 1, 0), worker(1, 1, 0)]).decode()
    assert 'modelgate_upstream_up{upstream="a"} 1.0' in merged
    assert "modelgate_redis_up 1.0" in merged
    assert "modelgate_redis_fail_open 0.0" in merged
