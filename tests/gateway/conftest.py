"""Fixtures shared by the gateway tests: a tritonclient on the module's own ``gateway``, and
redis-server processes for the quota tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import tritonclient.grpc as tc

from tests.support.gateway import RunningGateway
from tests.support.redis_server import RedisServer, fresh_redis


@pytest.fixture(scope="module")
def client(gateway: RunningGateway) -> Iterator[tc.InferenceServerClient]:
    """A tritonclient connected to the gateway fixture of the requesting module."""
    c = tc.InferenceServerClient(gateway.target)
    yield c
    c.close()


@pytest.fixture(scope="module")
def redis_module() -> Iterator[RedisServer]:
    """One redis-server for a whole test module."""
    yield from fresh_redis()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of its own, for a test that pauses, stops or restarts it."""
    yield from fresh_redis()
