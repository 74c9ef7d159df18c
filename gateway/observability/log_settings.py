"""The log level, as Triton's logging extension reads and sets it (LogSettings, /v2/logging):
Triton's switches (log_info, log_warning, log_error, log_verbose_level) and modelgate's
log_level, all over the one level of the server's logger, changeable while it runs."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Final

from gateway.errors import InvalidRequestError

Value = bool | int | str

LEVEL: Final = "log_level"
_NAMES: Final = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING,
                 "ERROR": logging.ERROR}
_SWITCHES: Final = {"log_info": logging.INFO, "log_warning": logging.WARNING,
                    "log_error": logging.ERROR}
VERBOSE: Final = "log_verbose_level"
# Triton's settings with one value here: reported, and accepted only unchanged.
_FIXED: Final[dict[str, Value]] = {"log_file": "", "log_format": "default"}
# Below ERROR is off: nothing but CRITICAL is written.
_OFF: Final = logging.CRITICAL


class LogSettings:
    """Reads and sets the level of ``logger`` (the server's root logger)."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def report(self) -> dict[str, Value]:
        """Every setting: Triton's switches as the level implies them, and log_level."""
        level = self._logger.getEffectiveLevel()
        report: dict[str, Value] = {name: level <= at for name, at in _SWITCHES.items()}
        report[VERBOSE] = 1 if level <= logging.DEBUG else 0
        report[LEVEL] = logging.getLevelName(level)
        report.update(_FIXED)
        return report

    def update(self, settings: Mapping[str, Value]) -> dict[str, Value]:
        """Apply ``settings`` all or nothing; returns the report."""
        level = self._logger.getEffectiveLevel()
        switches = {name: level <= at for name, at in _SWITCHES.items()}
        verbose = level <= logging.DEBUG
        named: int | None = None
        for name, value in settings.items():
            if name in _FIXED:
                if value != _FIXED[name]:
                    raise InvalidRequestError(
                        f"log setting '{name}' is {_FIXED[name]!r} in modelgate")
            elif name in _SWITCHES:
                if not isinstance(value, bool):
                    raise InvalidRequestError(f"log setting '{name}' takes true or false")
                switches[name] = value
            elif name == VERBOSE:
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise InvalidRequestError(f"{VERBOSE} takes a whole number, 0 or more")
                verbose = value > 0
            elif name == LEVEL:
                if not isinstance(value, str) or value.upper() not in _NAMES:
                    raise InvalidRequestError(
                        f"{LEVEL} must be one of {', '.join(_NAMES)}")
                named = _NAMES[value.upper()]
            else:
                raise InvalidRequestError(
                    f"unknown log setting '{name[:64]}'; modelgate has {LEVEL}, "
                    f"{', '.join(_SWITCHES)}, {VERBOSE} and {', '.join(_FIXED)}")
        if named is None:
            # The most detailed level any switch asks for (verbose: DEBUG).
            enabled = [at for name, at in _SWITCHES.items() if switches[name]]
            named = logging.DEBUG if verbose else min(enabled, default=_OFF)
        self._logger.setLevel(named)
        return self.report()
