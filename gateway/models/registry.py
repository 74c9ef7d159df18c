"""The served models as requests see them: lookup by name and a request's lease on the
version the resolver picks (which the shadow mirror reads). The manager extends it."""

from __future__ import annotations

from gateway.models.resolver import find_model, resolve
from gateway.models.routing import Router
from gateway.models.served import Lease, ServedModel, ServedVersion
from gateway.models.shadow import ShadowMirror
from gateway.tenancy.tenants import ANONYMOUS, Tenant


class ModelRegistry:
    """Every served model by name. Resolution never touches the file system."""

    def __init__(self, router: Router | None = None) -> None:
        self._router = router or Router()
        self._models: dict[str, ServedModel] = {}
        # Mirrors what the primary answered, from the lease (sampled by the router's coin).
        self.shadow = ShadowMirror(due=self._router.shadow_due)

    def models(self) -> list[ServedModel]:
        """Every model of the store, sorted by name."""
        return [self._models[name] for name in sorted(self._models)]

    def model(self, name: str) -> ServedModel:
        """The model called ``name``; NOT_FOUND for anything else, including invalid names."""
        return find_model(self._models, name)

    def version(
        self, name: str, version: str, label: str | None = None,
        tenant: Tenant = ANONYMOUS,
    ) -> ServedVersion:
        """The version a request names, in whatever state it is: '' means the highest READY
        version (or the tenant's pin); a number exactly that version; a label the version
        it points to."""
        return resolve(tenant, self._models, name, version, label=label, ready=False)

    def lease(
        self, tenant: Tenant, name: str, version: str = "", label: str | None = None,
        key: str | None = None,
    ) -> Lease:
        """Lease the ready version the resolver picks for ``tenant``'s request."""
        served = resolve(tenant, self._models, name, version, label=label, key=key,
                         router=self._router)
        assert served.runtime is not None  # resolve checked it is ready
        return Lease(served, served.runtime, self._models.get(name))

    def acquire(
        self, name: str, version: str = "", label: str | None = None, key: str | None = None
    ) -> Lease:
        """``lease`` for an unrestricted caller (the gateway's own requests, tests)."""
        return self.lease(ANONYMOUS, name, version, label, key)
