"""The model store on its own: version policies, model names, config parsing and the
repository scan that reports broken models instead of raising."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_store.config import parse_config_text, spec_from_config
from model_store.datatypes import DataType
from model_store.errors import InputMismatchError, InvalidModelNameError, ModelConfigError
from model_store.repository import ModelRepository
from model_store.spec import validate_model_name
from model_store.version_policy import VersionPolicy
from tests.support import models


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (VersionPolicy.latest(), (7,)),
        (VersionPolicy.latest(2), (3, 7)),
        (VersionPolicy.all(), (1, 3, 7)),
        (VersionPolicy.specific((1, 7, 9)), (1, 7)),
    ],
)
def test_version_policy(policy: VersionPolicy, expected: tuple[int, ...]) -> None:
    assert policy.select([3, 1, 7]) == expected


@pytest.mark.parametrize("name", ["", "..", "../x", "a/b", "a\\b", ".hidden", "x" * 129,
                                  "bad\nname", "-dash", "a..b"])
def test_invalid_model_names(name: str) -> None:
    with pytest.raises(InvalidModelNameError):
        validate_model_name(name)


@pytest.mark.parametrize("name", ["iris", "resnet-50", "bert_base.v2", "A1"])
def test_valid_model_names(name: str) -> None:
    assert validate_model_name(name) == name


def test_config_parses_triton_fields_and_ignores_the_unused_ones() -> None:
    text = models.add_model_config("m", extra="""
        dynamic_batching { preferred_batch_size: [2, 4] max_queue_delay_microseconds: 100
          default_queue_policy { max_queue_size: 16 timeout_action: DELAY } }
        instance_group [ { count: 2 kind: KIND_CPU }, { count: 1 kind: KIND_CPU } ]
        optimization { graph { level: 1 } }
        model_warmup [ { name: "w" batch_size: 1 } ]
        parameters { key: "k" value: { string_value: "v" } }
    """)
    spec = spec_from_config(parse_config_text(text, "m"))
    assert spec.instance_count == 3
    assert spec.dynamic_batching is not None
    assert spec.dynamic_batching.preferred_batch_sizes == (2, 4)
    assert spec.dynamic_batching.default_queue_policy.max_queue_size == 16
    assert spec.parameters == {"k": "v"}
    assert spec.inputs[0].datatype is DataType.FP32


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ("dynamic_batching { preferred_batch_size: [64] }", "preferred_batch_size"),
        ("no_such_field: 1", "no_such_field"),
        ('input { name: "r" data_type: TYPE_FP32 dims: [0] }', "positive"),
    ],
)
def test_bad_configs(extra: str, needle: str) -> None:
    with pytest.raises(ModelConfigError, match=needle):
        spec_from_config(parse_config_text(models.add_model_config("m", extra=extra), "m"))


def test_config_name_must_match_folder() -> None:
    with pytest.raises(ModelConfigError, match="folder"):
        parse_config_text(models.add_model_config("other"), "m")


def test_spec_checks_inputs() -> None:
    spec = spec_from_config(parse_config_text(models.add_model_config("m"), "m"))
    assert spec.check_inputs({"x": (DataType.FP32, (3, 4))}) == 3
    with pytest.raises(InputMismatchError, match="expected datatype FP32, got INT32"):
        spec.check_inputs({"x": (DataType.INT32, (3, 4))})


def test_scan_reports_each_problem_and_keeps_the_rest(tmp_path: Path) -> None:
    good = models.add_model_config("good")
    models.write_model(tmp_path, "good", 1, models.add_constant(1.0), good)
    (tmp_path / "good" / "notaversion").mkdir()
    (tmp_path / "good" / "007").mkdir()  # leading zero: not a version folder
    models.write_model(tmp_path, "noversions", 1, models.add_constant(1.0),
                       models.add_model_config("noversions"))
    (tmp_path / "noversions" / "1" / "model.onnx").unlink()
    (tmp_path / "bad name!").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "emptyfolder").mkdir()
    found = ModelRepository(tmp_path).scan()
    assert set(found) == {"good", "noversions", "emptyfolder"}
    assert found["good"].versions == (1,) and found["good"].error is None
    assert found["noversions"].version_errors == {1: "model file model.onnx is missing"}
    assert found["emptyfolder"].error is not None
    assert "no config.pbtxt" in found["emptyfolder"].error
