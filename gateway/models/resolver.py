"""The one answer to "which version serves this request": tenant pins and visibility, a
number or label (model_version or x-model-label), the weighted split sticky by x-routing-key,
then the version's readiness. Called once per request; pure over the served models."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from gateway.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    ModelNotReadyError,
    unknown_model,
)
from gateway.models.routing import Router, label_version, requested_target, split_version
from gateway.models.served import ServedModel, ServedVersion, VersionState
from gateway.sanitize import echoed
from gateway.tenancy.tenants import Tenant
from model_store.errors import InvalidModelNameError
from model_store.spec import validate_model_name

_VERSION: Final = re.compile(r"[0-9]{1,18}|[A-Za-z][A-Za-z0-9_\-]{0,63}")



def find_model(models: Mapping[str, ServedModel], name: str) -> ServedModel:
    """The model called ``name``; NOT_FOUND for anything else, including invalid names."""
    model = models.get(name)
    if model is None:
        # Only store folder names are keys, so a found name is valid; a miss is checked
        # so that an invalid name gets the same NOT_FOUND as an unknown one.
        try:
            validate_model_name(name)
        except InvalidModelNameError:
            raise unknown_model(name) from None
        raise unknown_model(name)
    return model


def visible_target(tenant: Tenant, name: str, target: str) -> str:
    """What ``tenant`` runs when it asks for ``target`` ('' = the default) of ``name``: its
    pin when it asked for none. A model or version it may not use is NOT_FOUND, worded
    like an unknown model, so a tenant learns nothing of other tenants' models."""
    if tenant.unrestricted:
        return target  # sees every model and version (open mode): nothing to check
    if not tenant.can_see(name):
        raise unknown_model(name)
    effective = tenant.effective_version(name, target)
    if not tenant.allows(name, effective):
        what = (f"version {int(effective)}" if effective.isdigit()
                else f"version label '{effective}'")
        raise ModelNotFoundError(f"model '{echoed(name)}' has no {what}")
    return effective


def resolve(
    tenant: Tenant, models: Mapping[str, ServedModel], name: str, version: str, *,
    label: str | None = None, key: str | None = None, router: Router | None = None,
    ready: bool = True,
) -> ServedVersion:
    """The version of ``name`` that serves ``tenant``'s request.

    ``version`` is model_version ('' for none), ``label`` the x-model-label entry (both may
    be sent when they name the same version). With neither, a tenant's pin decides; else the model's
    weighted split (``router`` picks the point, sticky by ``key``); else the highest ready
    version. ``ready`` (inference) also requires the chosen version to be READY with a
    runtime; without it (metadata, readiness, statistics) the version is returned in
    whatever state it is and no split is drawn."""
    known = models.get(name)
    # Only a model the tenant may see lends its labels (else agreement would tell them).
    labels = (known.routing.labels if known is not None
              and (tenant.unrestricted or tenant.can_see(name)) else None)
    target = visible_target(tenant, name, requested_target(version, label, labels))
    model = find_model(models, name)
    if model.error is not None:
        raise ModelNotReadyError(f"model '{name}' is unavailable: {model.error}")
    if target:
        served = _named(model, target)
    else:
        chosen: int | None = None
        if ready and router is not None and model.routing.weights:
            point = router.point(name, key)
            numbers = [n for n, v in model.versions.items() if v.state is VersionState.READY]
            chosen = split_version(model.routing, numbers, point)
        served = model.versions[chosen if chosen is not None else _highest_ready(model)]
    if ready and (served.state is not VersionState.READY or served.runtime is None):
        detail = f": {served.reason}" if served.reason else ""
        raise ModelNotReadyError(
            f"model '{name}' version {served.id.version} is {served.state.value.lower()}"
            f"{detail}"
        )
    return served


def _highest_ready(model: ServedModel) -> int:
    highest = -1
    for number, version in model.versions.items():
        if number > highest and version.state is VersionState.READY:
            highest = number
    if highest < 0:
        raise ModelNotReadyError(f"model '{model.name}' has no ready version")
    return highest


def _named(model: ServedModel, target: str) -> ServedVersion:
    if not _VERSION.fullmatch(target):
        raise InvalidRequestError(
            "model_version must be empty, a version number or a label "
            "([A-Za-z][A-Za-z0-9_-]*)"
        )
    number = int(target) if target.isdigit() else label_version(
        model.routing, model.name, target
    )
    served = model.versions.get(number)
    if served is None:
        via = f" (label '{target}')" if not target.isdigit() else ""
        raise ModelNotFoundError(f"model '{model.name}' has no version {number}{via}")
    return served
