"""The trace and log settings on their own: what each Triton setting means for the sampler's
bound and the logger's level, clearing, per-model overrides, and the values refused."""

from __future__ import annotations

import logging

import pytest

from gateway.errors import InvalidRequestError
from gateway.observability.log_settings import LogSettings
from gateway.observability.trace_settings import TraceSettings

WHOLE = 1 << 64  # TraceIdRatioBased's bound for a ratio of 1


def test_rates_ratios_and_levels_give_the_samplers_bound() -> None:
    settings = TraceSettings(0.5)
    assert settings.bound(None) == WHOLE // 2
    assert settings.update("", {"trace_rate": ["4"]})["sampling_ratio"] == ["0.25"]
    assert settings.bound("any") == WHOLE // 4
    assert settings.update("", {"sampling_ratio": ["1"]})["trace_rate"] == ["1"]
    off = settings.update("", {"trace_level": ["OFF"]})
    assert off["trace_level"] == ["OFF"] and settings.bound(None) == 0
    settings.update("", {"trace_level": [], "sampling_ratio": []})  # back to the start
    assert settings.bound(None) == WHOLE // 2
    assert settings.report()["trace_level"] == ["TIMESTAMPS"]


def test_a_models_settings_override_the_global_ones_until_cleared() -> None:
    settings = TraceSettings(None)  # the start-up sampler decides
    assert settings.bound(None) is None and settings.report()["trace_rate"] == [""]
    settings.update("m", {"trace_rate": ["10"]})
    assert settings.bound("m") == round(WHOLE / 10)
    assert settings.bound("other") is None and settings.bound(None) is None
    assert settings.report("other")["trace_rate"] == [""]
    settings.update("m", {"trace_level": ["OFF"]})
    assert settings.bound("m") == 0
    settings.update("m", {"trace_level": [], "trace_rate": []})
    assert settings.bound("m") is None  # follows the global settings again
    # A model's level and the global rate, or the other way round.
    settings.update("", {"trace_level": ["OFF"], "trace_rate": ["2"]})
    settings.update("m", {"trace_level": ["TIMESTAMPS"]})
    assert settings.bound("m") == WHOLE // 2 and settings.bound("other") == 0
    assert settings.report("m")["trace_level"] == ["TIMESTAMPS"]


@pytest.mark.parametrize(("changes", "message"), [
    ({"trace_level": ["LOUD"]}, "trace_level 'LOUD'"),
    ({"trace_level": ["OFF", "TIMESTAMPS"]}, "cannot be combined"),
    ({"trace_rate": ["often"]}, "must be a number"),
    ({"trace_rate": ["-1"]}, "0 or more"),
    ({"trace_rate": ["1", "2"]}, "takes one value"),
    ({"sampling_ratio": ["1.5"]}, "between 0 and 1"),
    ({"trace_file": ["/tmp/trace.json"]}, "trace_file"),
    ({"trace_mode": ["triton"]}, "trace_mode"),
    ({"colour": ["red"]}, "unknown trace setting 'colour'"),
])
def test_bad_trace_settings_are_refused_and_change_nothing(
    changes: dict[str, list[str]], message: str,
) -> None:
    settings = TraceSettings(0.5)
    with pytest.raises(InvalidRequestError, match=message):
        # Applied all or nothing: the good rate before the bad setting is not kept.
        settings.update("", {"trace_rate": ["2"], **changes})
    assert settings.bound(None) == WHOLE // 2


def test_without_an_exporter_tracing_cannot_be_turned_on() -> None:
    settings = TraceSettings(None, enabled=False)
    assert settings.report()["trace_level"] == ["OFF"]
    with pytest.raises(InvalidRequestError, match="no exporter"):
        settings.update("", {"trace_level": ["TIMESTAMPS"]})
    assert settings.update("", {"trace_level": ["OFF"]})["trace_level"] == ["OFF"]


@pytest.fixture
def logger() -> logging.Logger:
    log = logging.getLogger("modelgate-test-log-settings")
    log.setLevel(logging.INFO)
    return log


def test_switches_and_levels_set_one_level(logger: logging.Logger) -> None:
    settings = LogSettings(logger)
    report = settings.report()
    assert report["log_info"] is True and report["log_verbose_level"] == 0
    assert settings.update({"log_verbose_level": 2})["log_level"] == "DEBUG"
    assert logger.level == logging.DEBUG
    settings.update({"log_verbose_level": 0, "log_info": False})
    assert logger.level == logging.WARNING
    settings.update({"log_warning": False})
    assert logger.level == logging.ERROR
    off = settings.update({"log_error": False})
    assert logger.level == logging.CRITICAL and off["log_error"] is False
    assert settings.update({"log_level": "info"})["log_info"] is True


@pytest.mark.parametrize(("changes", "message"), [
    ({"log_info": 1}, "true or false"),
    ({"log_verbose_level": True}, "whole number"),
    ({"log_verbose_level": -1}, "whole number"),
    ({"log_level": "LOUD"}, "log_level must be one of"),
    ({"log_file": "/tmp/x.log"}, "log_file"),
    ({"log_format": "ISO8601"}, "log_format"),
    ({"log_colour": True}, "unknown log setting 'log_colour'"),
])
def test_bad_log_settings_are_refused_and_change_nothing(
    logger: logging.Logger, changes: dict[str, bool | int | str], message: str,
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        LogSettings(logger).update({"log_level": "DEBUG", **changes})
    assert logger.level == logging.INFO
