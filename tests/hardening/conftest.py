"""Shared fixtures of the hardening tests: a small store of real ONNX models and a tenants
file with an ordinary and an admin tenant."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from onnx import TensorProto, helper

from tests.gateway.tenancy.test_tenants import admin, issue
from tests.support import models

# CI runs a bounded number of examples without a deadline or the too-slow health check: on a
# shared 2-core machine both measure the machine's load, not the code under test.
# HYPOTHESIS_PROFILE=thorough runs many more on demand.
_SLOW_MACHINE = [HealthCheck.too_slow]
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=False,
                          suppress_health_check=_SLOW_MACHINE)
settings.register_profile("thorough", max_examples=2000, deadline=None,
                          suppress_health_check=_SLOW_MACHINE)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

BATCHED_CONFIG = models.add_model_config(
    "batched", max_batch_size=8,
    extra="dynamic_batching { max_queue_delay_microseconds: 20000 }\n",
)


@pytest.fixture(scope="package")
def hardening_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``add`` (y = x + 1, unbatched scheduling), ``batched`` (y = x + 1 with a 20 ms
    queue delay so concurrent requests share batches), ``all_types`` and ``any_shape``
    (FP32 identity of any 2-D shape, not batched)."""
    root = tmp_path_factory.mktemp("hardening-store")
    models.write_model(root, "add", 1, models.add_constant(1.0), models.add_model_config("add"))
    models.write_model(root, "batched", 1, models.add_constant(1.0), BATCHED_CONFIG)
    models.write_model(root, "all_types", 1, models.identity_all_types(),
                       models.all_types_config())
    models.write_model(root, "any_shape", 1, any_shape_model(), models.config_pbtxt(
        "any_shape", [("a", "FP32", [-1, -1])], [("b", "FP32", [-1, -1])], max_batch_size=0))
    return root


def any_shape_model() -> bytes:
    """Identity on FP32 of any 2-D shape, unbatched: only the gateway's cap limits it."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["b"])], "any_shape",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["r", "c"])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, ["r", "c"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return bytes(model.SerializeToString())


@pytest.fixture(scope="package")
def tenant_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """(tenants file, an ordinary tenant's key, an admin tenant's key)."""
    path = tmp_path_factory.mktemp("hardening-tenants") / "tenants.toml"
    assert admin(path, "create", "user", "--models", "*")[0] == 0
    assert admin(path, "create", "boss", "--models", "*", "--admin")[0] == 0
    return path, issue(path, "user"), issue(path, "boss")
