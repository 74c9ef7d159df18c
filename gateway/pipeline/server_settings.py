"""Triton's trace and logging extensions, transport-free (what TraceSetting, LogSettings,
/v2[/models/{m}]/trace/setting and /v2/logging answer): any caller reads; a change, which
holds for every tenant, needs an admin tenant, as model control does."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from gateway.models.model_control import require_admin
from gateway.models.registry import ModelRegistry
from gateway.models.resolver import visible_target
from gateway.observability.log_settings import LogSettings, Value
from gateway.observability.trace_settings import TraceSettings, Values
from gateway.tenancy.tenants import Tenant

log = logging.getLogger(__name__)


class ServerSettings:
    """The trace settings (global and per model) and the log settings of this process."""

    def __init__(self, models: ModelRegistry, trace: TraceSettings | None,
                 logs: LogSettings) -> None:
        self._models = models
        # Tracing off (no exporter): settings read OFF and refuse to turn it on.
        self._trace = trace if trace is not None else TraceSettings(None, enabled=False)
        self._logs = logs

    def trace(self, tenant: Tenant, model: str,
              changes: Mapping[str, Values] | None) -> dict[str, list[str]]:
        """The trace settings of ``model`` ('' = global), after ``changes`` if any (an
        empty value list clears a setting: a model's then follows the global one)."""
        if model:
            visible_target(tenant, model, "")  # another tenant's model: unknown
            self._models.model(model)  # NOT_FOUND for one that is not served
        if not changes:
            return self._trace.report(model)
        who = require_admin(tenant, "changing trace settings")
        report = self._trace.update(model, changes)
        log.info("trace settings of %s set by tenant %s: %s", model or "the server", who,
                 report)
        return report

    def logging(self, tenant: Tenant, changes: Mapping[str, Value] | None
                ) -> dict[str, Value]:
        """The log settings, after ``changes`` if any."""
        if not changes:
            return self._logs.report()
        who = require_admin(tenant, "changing log settings")
        report = self._logs.update(changes)
        log.warning("log settings set by tenant %s: %s", who, report)
        return report
