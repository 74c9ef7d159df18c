"""The served models as requests see them: lookup by name, a request's lease on the version
the resolver picks, and the shadow mirror. The manager (reconciliation) extends it."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from gateway.models.resolver import find_model, resolve
from gateway.models.routing import Router
from gateway.models.served import Lease, ServedModel, ServedVersion, VersionState
from gateway.models.shadow import ShadowMirror
from gateway.request.context import RequestRecord
from gateway.tenancy.tenants import ANONYMOUS, Tenant
from runtimes.base import InferRequest, Tensor

ShadowObserver = Callable[[ServedVersion, InferRequest, Mapping[str, Tensor]], None]


class ModelRegistry:
    """Every served model by name. Resolution never touches the file system."""

    def __init__(self, router: Router | None = None) -> None:
        self._router = router or Router()
        self._models: dict[str, ServedModel] = {}
        self.shadow = ShadowMirror()
        # Told of every shadow answer (the drift monitor compares shadow and primary
        # outputs); they must not block. A failure counts as the shadow's error.
        self.shadow_observers: list[ShadowObserver] = []

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
        return Lease(served, served.runtime)

    def acquire(
        self, name: str, version: str = "", label: str | None = None, key: str | None = None
    ) -> Lease:
        """``lease`` for an unrestricted caller (the gateway's own requests, tests)."""
        return self.lease(ANONYMOUS, name, version, label, key)

    def mirror(
        self, lease: Lease, request: InferRequest, outputs: Mapping[str, Tensor],
        record: RequestRecord | None = None,
    ) -> None:
        """Mirror a request the primary answered to the model's shadow version, if its
        routing asks for one and this request is sampled. Never raises, never waits; the
        shadow's span is a child of ``record``'s when that request is traced."""
        primary = lease.version.id
        model = self._models.get(primary.name)
        if model is None:
            return
        table = model.routing
        shadow = table.shadow
        if shadow is None or shadow == primary.version or not self._router.shadow_due(table):
            return
        target = model.versions.get(shadow)
        if target is None or target.state is not VersionState.READY:
            self.shadow.skip(primary.name, primary.version, shadow)
            return
        copy = InferRequest(
            inputs=request.inputs, outputs=request.outputs, rows=request.rows,
            priority=request.priority, trace_headers=request.trace_headers,
        )

        async def run() -> dict[str, Tensor]:
            with self.acquire(primary.name, str(shadow)) as shadow_lease:
                answer = await shadow_lease.runtime.infer(copy)
                for observer in self.shadow_observers:
                    observer(shadow_lease.version, copy, answer)
                return answer

        parent = (record.tracer, record.span) if record and record.tracer and record.span else None
        self.shadow.mirror(primary.name, primary.version, shadow, run, outputs, parent=parent)
