"""Fixtures of the REST tests: a store of tiny real ONNX models, a tenants file, and the real
Gateway serving both transports on loopback (the REST port on a free port)."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.gateway.tenancy.test_tenants import admin, issue
from tests.support import models
from tests.support.gateway import RunningGateway, running_gateway

BATCHED_CONFIG = models.add_model_config(
    "batched", max_batch_size=8,
    extra="dynamic_batching { max_queue_delay_microseconds: 20000 }\n",
)


@pytest.fixture(scope="package")
def rest_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``add`` (version 1: y = x + 1, version 2: y = x + 10), ``batched`` (y = x + 1 with a
    queue delay) and ``all_types`` (an identity per V2 datatype, [N, 3])."""
    root = tmp_path_factory.mktemp("rest-store")
    models.write_model(root, "add", 1, models.add_constant(1.0), models.add_model_config(
        "add", extra="version_policy: { all { } }\n"))
    models.write_model(root, "add", 2, models.add_constant(10.0), None)
    models.write_model(root, "batched", 1, models.add_constant(1.0), BATCHED_CONFIG)
    models.write_model(root, "all_types", 1, models.identity_all_types(),
                       models.all_types_config())
    return root


@dataclass(frozen=True)
class Keys:
    path: Path
    user: str  # sees every model, no limits
    boss: str  # admin
    metered: str  # three requests, then its quota answers


@pytest.fixture(scope="package")
def rest_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    path = tmp_path_factory.mktemp("rest-tenants") / "tenants.toml"
    assert admin(path, "create", "user", "--models", "*")[0] == 0
    assert admin(path, "create", "boss", "--models", "*", "--admin")[0] == 0
    assert admin(path, "create", "metered", "--models", "*", "--requests-per-s", "0.001",
                 "--burst", "3")[0] == 0
    return Keys(path, issue(path, "user"), issue(path, "boss"), issue(path, "metered"))


@pytest.fixture(scope="module")
def open_gateway(rest_store: Path) -> Iterator[RunningGateway]:
    """No tenants file: every caller is the open tenant."""
    with running_gateway(rest_store, http_port=0, http_read_timeout_s=1.0,
                         max_message_bytes=1 << 20) as gateway:
        yield gateway


@dataclass
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def rest(port: int, method: str, path: str, body: bytes | str | dict[str, Any] | None = None,
         headers: Mapping[str, str] | None = None) -> Answer:
    """One request on a fresh keep-alive connection (http.client, no client library)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else (
        body.encode() if isinstance(body, str) else body)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=data, headers=dict(headers or {}))
        response = connection.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()},
                      response.read())
    finally:
        connection.close()
