"""The repository API's policy: RepositoryModelLoad / RepositoryModelUnload are off unless
enabled, only for admin tenants, and take nothing from a request but a checked model name."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Set
from typing import Final, Protocol

from gateway.errors import (
    InvalidRequestError,
    ModelControlDisabledError,
    ModelNotFoundError,
    PermissionDeniedError,
)
from gateway.models.manager import ModelManager
from gateway.tenancy.tenants import Tenant

log = logging.getLogger(__name__)

# tritonclient's unload_model always sends this; it has no meaning without ensembles.
_UNLOAD_PARAMETERS: Final = frozenset({"unload_dependents"})


class ControlRequest(Protocol):
    """The fields RepositoryModelLoadRequest and RepositoryModelUnloadRequest share."""

    @property
    def repository_name(self) -> str: ...

    @property
    def model_name(self) -> str: ...

    @property
    def parameters(self) -> Mapping[str, object]: ...


def require_admin(tenant: Tenant, action: str = "model control") -> str:
    """The tenant's id if it is an admin; PermissionDeniedError naming ``action`` otherwise
    (everything that changes the server's state for all tenants is an admin's)."""
    if not tenant.admin:
        raise PermissionDeniedError(f"{action} needs an admin tenant's API key")
    return tenant.id


class ModelControl:
    """Checks a control request, then has the manager load or unload the model."""

    def __init__(self, manager: ModelManager, enabled: bool) -> None:
        self._manager = manager
        self._enabled = enabled

    async def load(self, tenant: Tenant, request: ControlRequest) -> None:
        """Re-read the model from the store and serve it (new versions load and warm up
        before anything they replace stops serving)."""
        who = self._admit(tenant, request, allowed=frozenset())
        log.info("RepositoryModelLoad %r by tenant %s", request.model_name, who)
        await self._manager.load_model(request.model_name)

    async def unload(self, tenant: Tenant, request: ControlRequest) -> None:
        """Stop serving the model once its in-flight requests are done."""
        who = self._admit(tenant, request, allowed=_UNLOAD_PARAMETERS)
        log.info("RepositoryModelUnload %r by tenant %s", request.model_name, who)
        await self._manager.unload_model(request.model_name)

    def _admit(self, tenant: Tenant, request: ControlRequest, allowed: Set[str]) -> str:
        if not self._enabled:
            raise ModelControlDisabledError(
                "model control is off; start modelgate with --enable-model-control"
            )
        who = require_admin(tenant)
        if request.repository_name:
            raise ModelNotFoundError(
                "this server has one model repository; leave repository_name empty"
            )
        extra = sorted(set(request.parameters) - allowed)
        if extra:
            # Triton's 'config' and 'file:' overrides would let a request supply model
            # files; modelgate only ever reads its own store.
            raise InvalidRequestError(
                f"parameter(s) {', '.join(extra)[:200]} are not accepted: modelgate loads "
                "models only from its store"
            )
        return who
