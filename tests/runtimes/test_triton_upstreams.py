"""Upstream declarations (NAME=HOST:PORT,key=value) and the pool's choice of upstream:
healthy first, model-ready first, least outstanding, ties in turn, limits respected."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from runtimes.errors import UpstreamBusyError, UpstreamUnavailableError
from runtimes.upstreams import UpstreamConfig, UpstreamPool, parse_upstream
from tests.support.gateway import free_port


def test_parse_minimal() -> None:
    config = parse_upstream("gpu1=10.0.0.5:8001")
    assert config == UpstreamConfig("gpu1", "10.0.0.5", 8001)
    assert config.target == "10.0.0.5:8001"


def test_parse_options(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    config = parse_upstream(
        f"a=[::1]:9000,max_in_flight=16,timeout_s=2.5,export=all,ca={ca},server_name=triton"
    )
    assert (config.host, config.port, config.target) == ("::1", 9000, "[::1]:9000")
    assert (config.max_in_flight, config.timeout_s, config.export) == (16, 2.5, True)
    assert config.tls is not None
    assert (config.tls.ca_file, config.tls.server_name) == (ca, "triton")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("nohost", "NAME=HOST:PORT"),
        ("a=host", "not HOST:PORT"),
        ("a=host:99999", "not HOST:PORT"),
        ("a=host:1,colour=red", "unknown option"),
        ("a=host:1,max_in_flight=-1", "must not be negative"),
        ("a=host:1,cert=/nonexistent.pem", "cert and key go together"),
        ("a=host:1,ca=/nonexistent.pem", "is not a file"),
        ("a=host:1,export=maybe", "not a boolean"),
    ],
)
def test_parse_rejects(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_upstream(text)


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    # Nothing listens on these ports: the first probe takes both out; tests set the state.
    configs = [
        UpstreamConfig("a", "127.0.0.1", free_port(), max_in_flight=2),
        UpstreamConfig("b", "127.0.0.1", free_port()),
    ]
    pool = UpstreamPool(configs, probe_interval_s=3600)
    await pool.start()
    try:
        yield pool
    finally:
        await pool.close()


async def test_unreachable_upstreams_are_taken_out(pool: UpstreamPool) -> None:
    assert not any(u.healthy for u in pool.upstreams.values())
    assert "UNAVAILABLE" in pool.upstreams["a"].reason
    with pytest.raises(UpstreamUnavailableError, match="a \\(down"):
        pool.pick(["a", "b"], "m", "1")
    assert not pool.model_ready(["a", "b"], "m", "1")


async def test_pick_prefers_ready_then_least_outstanding(pool: UpstreamPool) -> None:
    a, b = pool.upstreams["a"], pool.upstreams["b"]
    a.healthy = b.healthy = True
    a.ready_models = {("m", "1")}
    assert {pool.pick(["a", "b"], "m", "1").name for _ in range(4)} == {"a"}
    b.ready_models = {("m", "1")}
    assert {pool.pick(["a", "b"], "m", "1").name for _ in range(4)} == {"a", "b"}
    a.outstanding = 1
    assert {pool.pick(["a", "b"], "m", "1").name for _ in range(4)} == {"b"}
    assert pool.pick(["a", "b"], "m", "1", exclude=b).name == "a"
    # Neither has the model ready by the probes: a healthy one is asked all the same.
    assert pool.pick(["a", "b"], "other", "1").name in {"a", "b"}


async def test_max_in_flight_is_respected(pool: UpstreamPool) -> None:
    a = pool.upstreams["a"]
    a.healthy = True
    a.outstanding = 2  # its limit
    with pytest.raises(UpstreamBusyError):
        pool.pick(["a"], "m", "1")


async def test_take_out_and_probe_back(pool: UpstreamPool) -> None:
    a = pool.upstreams["a"]
    a.healthy = True
    pool.take_out(a, "test")
    assert not a.healthy
    await pool.probe()  # still nothing listening: stays out
    assert not a.healthy
