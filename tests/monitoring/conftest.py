"""The monitoring tests' shared fixture: a gRPC client of the module's own ``gateway``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import tritonclient.grpc as tc

from tests.support.gateway import RunningGateway


@pytest.fixture(scope="module")
def client(gateway: RunningGateway) -> Iterator[tc.InferenceServerClient]:
    c = tc.InferenceServerClient(gateway.target)
    yield c
    c.close()
