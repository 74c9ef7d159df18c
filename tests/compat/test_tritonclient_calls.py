"""Every server-facing method of tritonclient's grpc, grpc.aio, http and http.aio clients
against the real gateway, a success and an error case each, and the same call against a
real tritonserver on the same models: the answers must agree (as far as each case's
projection reaches; what differs on purpose is named in the case)."""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import pytest

from gateway.pipeline.catalog import EXTENSIONS
from tests.compat.calls import (
    CLIENT_SIDE,
    GRPC,
    HTTP,
    KINDS,
    MODULES,
    STREAMS,
    Case,
    Outcome,
    _all_types,
    _args,
    _config,
    _id_and_outputs,
    _index,
    _infer,
    _json,
    _keys,
    _outputs,
    _same,
    _setting_names,
    _statistics,
    _tensors,
    call,
    settings_of,
)
from tests.compat.conftest import Server
from tests.compat.extension_cases import CLASSIFICATION_REFUSALS

pytestmark = pytest.mark.timeout(600)

X5: Final = np.ones((2, 5), dtype=np.float32)  # the add model takes [N, 4]


def _status(grpc_code: str, http: int) -> dict[str, str]:
    return {"grpc": f"StatusCode.{grpc_code}", "http": str(http)}


NOT_FOUND: Final = _status("NOT_FOUND", 404)
INVALID: Final = _status("INVALID_ARGUMENT", 400)
UNIMPLEMENTED: Final = _status("UNIMPLEMENTED", 501)


def _extensions(answer: dict[str, Any], kind: str) -> None:
    assert answer["name"] == "modelgate"
    assert list(answer["extensions"]) == list(EXTENSIONS)


def _numbers(answer: dict[str, Any], kind: str) -> None:
    config = answer["config"] if kind in GRPC else answer
    if kind in HTTP:  # Triton's HTTP config gives 64-bit integers as numbers
        assert config["input"][0]["dims"] == [4]


def _subset(answer: Any, kind: str) -> None:
    assert set(_outputs(answer, kind)) == {"y"}


def _traced_at_50(answer: dict[str, Any], kind: str) -> None:
    assert settings_of(answer, kind)["trace_rate"] in ("50", ["50"])


def _log_switches(answer: dict[str, Any], kind: str) -> None:
    settings = settings_of(answer, kind)
    assert {"log_info", "log_warning", "log_error", "log_verbose_level"} <= set(settings)


def _triton_trace_names(answer: dict[str, Any], kind: str) -> Any:
    """Triton's trace setting names (modelgate adds sampling_ratio, the exact ratio)."""
    return [name for name in _setting_names(answer, kind) if name != "sampling_ratio"]


CONTROL_OFF: Final = ("Triton: UNAVAILABLE / 503; modelgate: FAILED_PRECONDITION / 400, "
                      "the request cannot succeed until the server is restarted")

CASES: Final[list[Case]] = [
    # health (the core protocol): an unknown model is not ready, not an error
    Case("health-live", "is_server_live", project=_same),
    Case("health-ready", "is_server_ready", project=_same),
    Case("health-model-ready", "is_model_ready", _args("add"), project=_same),
    Case("health-unknown-model-not-ready", "is_model_ready", _args("nope"), project=_same),
    Case("health-unknown-version-not-ready", "is_model_ready", _args("add", "9"),
         project=_same),
    # metadata
    Case("metadata-server", "get_server_metadata", _json(), project=_keys,
         check=_extensions),
    Case("metadata-model", "get_model_metadata", _json("add"), project=_tensors),
    Case("metadata-unknown-model", "get_model_metadata", _json("nope"), error=True,
         status=NOT_FOUND),
    # model_configuration
    Case("model_configuration-config", "get_model_config", _json("add"), project=_config,
         check=_numbers),
    Case("model_configuration-unknown-model", "get_model_config", _json("nope"),
         error=True, status=NOT_FOUND),
    # model_repository: the index (tritonclient sends nothing a server could refuse)
    Case("model_repository-index", "get_model_repository_index", _json(), project=_index),
    # statistics
    Case("statistics-model", "get_inference_statistics", _json("add"), project=_statistics),
    Case("statistics-unknown-model", "get_inference_statistics", _json("nope"), error=True,
         status=NOT_FOUND, why="Triton: INVALID_ARGUMENT / 400; modelgate answers an "
         "unknown model NOT_FOUND / 404 on every route alike"),
    # inference
    Case("infer-binary", "infer", _infer(binary=True), project=_outputs),
    Case("infer-json", "infer", _infer(binary=False), kinds=HTTP, project=_outputs),
    Case("infer-outputs-subset", "infer", _infer(outputs=["y"]), project=_outputs,
         check=_subset),
    Case("infer-request-id", "infer", _infer(request_id="req-7"), project=_id_and_outputs),
    Case("parameters-infer", "infer", _infer(parameters={"note": "compat"}),
         project=_outputs),
    Case("binary_tensor_data-bytes-and-every-type", "infer", _all_types(binary=True),
         project=_outputs),
    Case("infer-json-bytes-and-every-type", "infer", _all_types(binary=False), kinds=HTTP,
         project=_outputs, why="Triton refuses FP16 as JSON numbers; modelgate takes them"),
    Case("infer-async", "async_infer", _infer(request_id="async-1"),
         kinds=frozenset({"grpc", "http"}), project=_id_and_outputs),
    Case("infer-unknown-model", "infer", _infer(model="nope"), error=True,
         status=NOT_FOUND),
    Case("infer-wrong-shape", "infer", _infer(data=X5), error=True, status=INVALID),
    Case("infer-async-unknown-model", "async_infer", _infer(model="nope"),
         kinds=frozenset({"grpc", "http"}), error=True, status=NOT_FOUND),
    # model_repository: load and unload with model control off (test_settings_and_control.py
    # has them with it on)
    Case("model_repository-load-control-off", "load_model", _args("add"), error=True,
         status=_status("FAILED_PRECONDITION", 400), why=CONTROL_OFF),
    Case("model_repository-unload-control-off", "unload_model", _args("add"), error=True,
         status=_status("FAILED_PRECONDITION", 400), why=CONTROL_OFF),
    # trace: read and change (open mode: the caller is an admin), globally and per model
    Case("trace-get", "get_trace_settings", _json(), project=_triton_trace_names),
    Case("trace-get-model", "get_trace_settings", _json(model_name="add"),
         project=_triton_trace_names),
    Case("trace-update-rate", "update_trace_settings",
         _json(settings={"trace_rate": "50"}), check=_traced_at_50),
    Case("trace-update-model-rate", "update_trace_settings",
         _json(model_name="add", settings={"trace_rate": "50"}), check=_traced_at_50),
    Case("trace-update-bad-level", "update_trace_settings",
         _json(settings={"trace_level": ["LOUD"]}), error=True, status=INVALID,
         why="Triton ignores a level it does not know; modelgate names it"),
    Case("trace-get-unknown-model", "get_trace_settings", _json(model_name="nope"),
         error=True, status=NOT_FOUND, why="Triton answers any name"),
    # logging
    Case("logging-get", "get_log_settings", _json(), check=_log_switches),
    # verbose 0 leaves the level as it is (the test process's root logger)
    Case("logging-update", "update_log_settings",
         _json(settings={"log_verbose_level": 0}), check=_log_switches),
    Case("logging-update-unknown-setting", "update_log_settings",
         _json(settings={"log_colour": True}), error=True, status=INVALID,
         why="Triton ignores a setting it does not know; modelgate names it"),
]

# Triton implements what modelgate refuses here, so these are not compared with it. While
# EXTENSIONS (gateway/pipeline/catalog.py) does not list system_shared_memory its methods
# are refused too; once it does, those rows go and SERVED_SHARED_MEMORY_CASES must call
# them (test_every_public_method_is_called fails until it does).
SYSTEM_REFUSED: Final[list[Case]] = [
    Case("system_shared_memory-status", "get_system_shared_memory_status", _json(),
         error=True, status=UNIMPLEMENTED),
    Case("system_shared_memory-register", "register_system_shared_memory",
         _args("region", "/modelgate-compat", 64), error=True, status=UNIMPLEMENTED),
    Case("system_shared_memory-unregister", "unregister_system_shared_memory",
         _args("region"), error=True, status=UNIMPLEMENTED),
]
CUDA_REFUSED: Final[list[Case]] = [
    Case("cuda_shared_memory-status", "get_cuda_shared_memory_status", _json(),
         error=True, status=UNIMPLEMENTED),
    Case("cuda_shared_memory-register", "register_cuda_shared_memory",
         _args("region", b"\0" * 64, 0, 64), error=True, status=UNIMPLEMENTED),
    Case("cuda_shared_memory-unregister", "unregister_cuda_shared_memory", _args("region"),
         error=True, status=UNIMPLEMENTED),
]
# The served extension's refusals; test_shared_memory.py has register, infer, status and
# unregister succeeding.
SERVED_SHARED_MEMORY_CASES: Final[list[Case]] = [
    Case("system_shared_memory-register-missing-key", "register_system_shared_memory",
         _args("region", "/modelgate-compat-missing", 64), error=True,
         why="Triton: INTERNAL / 500; modelgate: NOT_FOUND / 404 naming the object"),
    Case("system_shared_memory-status-unknown-region", "get_system_shared_memory_status",
         _json(region_name="nope"), error=True),
    Case("system_shared_memory-unregister-unknown-region",
         "unregister_system_shared_memory", _args("nope")),
]
SHARED_MEMORY_CASES: Final = [
    *(SERVED_SHARED_MEMORY_CASES if "system_shared_memory" in EXTENSIONS else SYSTEM_REFUSED),
    *CUDA_REFUSED,
]
# Classification (class_count) and compression: compared with Triton like CASES; 23B adds
# its hostile rows (bad counts, BYTES outputs, gzip bombs) here.
CLASSIFICATION_CASES: Final[list[Case]] = [
    Case("classification-top-2", "infer", _infer(outputs=["y"], class_count=2),
         project=_outputs),
    Case("classification-json-top-1", "infer",
         _infer(binary=False, outputs=["y", "doubled"], class_count=1), kinds=HTTP,
         project=_outputs),
]
COMPRESSION_CASES: Final[list[Case]] = [
    Case(f"infer-compressed-{algorithm}", "infer", _infer(compression=algorithm),
         project=_outputs)
    for algorithm in ("gzip", "deflate")
]

# Modelgate only (extension_cases.py says what Triton does instead).
ALL_CASES: Final = [*CASES, *SHARED_MEMORY_CASES, *CLASSIFICATION_CASES, *COMPRESSION_CASES,
                    *CLASSIFICATION_REFUSALS]
# Methods made elsewhere: the stream methods (test_streams.py). load_model and unload_model
# succeed in test_settings_and_control.py (model control on).
ELSEWHERE: Final = STREAMS


def _grid(cases: list[Case]) -> list[Any]:
    return [pytest.param(kind, case, id=f"{kind}-{case.id}")
            for case in cases for kind in KINDS if kind in case.kinds]


def _family(kind: str) -> str:
    return "grpc" if kind in GRPC else "http"


def _assert_outcome(outcome: Outcome, case: Case, kind: str) -> None:
    if case.error:
        assert outcome.failed, f"{case.method} succeeded: {outcome.answer!r}"
        expected = case.status.get(_family(kind))
        if expected is not None:
            assert outcome.status == expected, outcome
        assert outcome.message
    else:
        assert not outcome.failed, outcome
        if case.check is not None:
            case.check(outcome.answer, kind)


@pytest.mark.parametrize(("kind", "case"), _grid(ALL_CASES))
def test_modelgate_answers(modelgate: Server, kind: str, case: Case) -> None:
    _assert_outcome(call(modelgate, kind, case), case, kind)


@pytest.mark.parametrize(("kind", "case"), _grid([
    *CASES, *CLASSIFICATION_CASES, *COMPRESSION_CASES,
    *(SERVED_SHARED_MEMORY_CASES if "system_shared_memory" in EXTENSIONS else []),
]))
def test_triton_answers_alike(modelgate: Server, triton: Server, kind: str,
                              case: Case) -> None:
    """The same call to tritonserver: both fail (with the same status, unless the case
    says why not) or both succeed with the same projected answer."""
    ours, theirs = call(modelgate, kind, case), call(triton, kind, case)
    assert ours.failed == theirs.failed or case.why, (ours, theirs)
    if ours.failed and theirs.failed and not case.why:
        assert ours.status == theirs.status, (ours, theirs)
    elif not ours.failed and not theirs.failed and case.project is not None:
        assert case.project(ours.answer, kind) == case.project(theirs.answer, kind)


def test_every_public_method_is_called() -> None:
    """The suite reaches every server-facing public method of each client."""
    for kind, module in MODULES.items():
        methods = {name for name in dir(module.InferenceServerClient)
                   if not name.startswith("_")} - CLIENT_SIDE - ELSEWHERE
        called = {c.method for c in ALL_CASES if kind in c.kinds} | {
            "load_model", "unload_model"}
        assert methods <= called, (kind, sorted(methods - called))
        errors = {c.method for c in ALL_CASES if kind in c.kinds and c.error}
        # These take nothing a server could refuse.
        # Unregistering a region that is not there is a no-op on both servers.
        no_error = {"is_server_live", "is_server_ready", "is_model_ready", "get_server_metadata",
                    "unregister_system_shared_memory",
                    "get_model_repository_index", "get_log_settings"}
        assert methods - no_error <= errors, (kind, sorted(methods - no_error - errors))

