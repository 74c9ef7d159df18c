"""Fixtures shared by the gateway tests: a tritonclient on the module's own ``gateway``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import tritonclient.grpc as tc

from tests.support.gateway import RunningGateway


@pytest.fixture(scope="module")
def client(gateway: RunningGateway) -> Iterator[tc.InferenceServerClient]:
    """A tritonclient connected to the gateway fixture of the requesting module."""
    c = tc.InferenceServerClient(gateway.target)
    yield c
    c.close()
