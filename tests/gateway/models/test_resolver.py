"""The resolver as a table: one row per way a request names (or does not name) a version,
with the tenant's pins, the model's labels and weighted split, and each version's state."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from gateway.errors import (
    GatewayError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelNotReadyError,
)
from gateway.models.resolver import resolve
from gateway.models.routing import Router, RoutingTable
from gateway.models.served import ServedModel, ServedVersion, VersionState
from gateway.tenancy.tenants import ANONYMOUS, ModelGrant, Tenant
from model_store.config import parse_config_text, spec_from_config
from model_store.labels import parse_routing
from model_store.spec import ModelId
from tests.support.fake_runtime import FakeRuntime
from tests.support.models import add_model_config

SPEC = spec_from_config(parse_config_text(add_model_config("m"), "m"))
ROUTING = '[labels]\nstable = 1\ncanary = 3\nbroken = 4\n[weights]\nstable = 50\ncanary = 50\n'


def _version(number: int, state: VersionState, reason: str = "") -> ServedVersion:
    served = ServedVersion(id=ModelId("m", number), spec=SPEC, state=state, reason=reason)
    if state is VersionState.READY:
        served.runtime = FakeRuntime(SPEC, number)
    return served


def _models(routing: str = "", error: str | None = None) -> dict[str, ServedModel]:
    model = ServedModel(name="m", spec=SPEC, error=error, versions={
        1: _version(1, VersionState.READY),
        2: _version(2, VersionState.READY),
        3: _version(3, VersionState.READY),
        4: _version(4, VersionState.UNAVAILABLE, "load failed: bad file"),
        5: _version(5, VersionState.LOADING),
    })
    if routing:
        model.routing = RoutingTable.from_spec(parse_routing(routing))
    return {"m": model}


PINNED = Tenant(id="pinned", models=(ModelGrant("m", "2"),))
LABEL_PINNED = Tenant(id="canary-only", models=(ModelGrant("m", "canary"),))
OTHER = Tenant(id="other", models=(ModelGrant("x*"),))


@dataclass(frozen=True)
class Row:
    why: str
    version: str = ""
    label: str | None = None
    key: str | None = None
    tenant: Tenant = ANONYMOUS
    routing: str = ""
    model_error: str | None = None
    name: str = "m"
    ready: bool = True
    expect: int | type[GatewayError] = 0
    message: str = ""


ROWS = [
    Row("no version: the highest ready one", expect=3),
    Row("a number", version="1", expect=1),
    Row("a label in model_version", version="stable", routing=ROUTING, expect=1),
    Row("a label as x-model-label", label="canary", routing=ROUTING, expect=3),
    Row("both, agreeing", version="canary", label="canary", routing=ROUTING, expect=3),
    Row("the label's version number and the label", version="3", label="canary",
        routing=ROUTING, expect=3),
    Row("both, disagreeing", version="1", label="canary", routing=ROUTING,
        expect=InvalidRequestError, message="disagree"),
    Row("a malformed label", label="-x", expect=InvalidRequestError, message="x-model-label"),
    Row("a malformed version", version="1.5", expect=InvalidRequestError,
        message="model_version must be"),
    Row("an undeclared label", version="nightly", routing=ROUTING, expect=ModelNotFoundError,
        message="no version label 'nightly'"),
    Row("a version that does not exist", version="9", expect=ModelNotFoundError,
        message="no version 9"),
    Row("a version that failed to load", version="4", expect=ModelNotReadyError,
        message="version 4 is unavailable: load failed"),
    Row("a label of a failed version", label="broken", routing=ROUTING,
        expect=ModelNotReadyError, message="version 4 is unavailable"),
    Row("a loading version", version="5", expect=ModelNotReadyError, message="is loading"),
    Row("a loading version, state not required", version="5", ready=False, expect=5),
    Row("the split, sticky by key", key="user-1", routing=ROUTING, expect=-1),
    Row("no split without ready required", routing=ROUTING, ready=False, expect=3),
    Row("a pinned tenant asking for none gets its pin", tenant=PINNED, expect=2),
    Row("a pinned tenant asking for its pin", tenant=PINNED, version="2", expect=2),
    Row("a pinned tenant asking for another version", tenant=PINNED, version="3",
        expect=ModelNotFoundError, message="model 'm' has no version 3"),
    Row("a label-pinned tenant gets the label's version", tenant=LABEL_PINNED,
        routing=ROUTING, expect=3),
    Row("a tenant without the model: like an unknown one", tenant=OTHER,
        expect=ModelNotFoundError, message="unknown model 'm'"),
    Row("an unknown model", name="nope", expect=ModelNotFoundError,
        message="unknown model 'nope'"),
    Row("a model that cannot be served", model_error="config is broken",
        expect=ModelNotReadyError, message="unavailable: config is broken"),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.why for r in ROWS])
def test_resolution(row: Row) -> None:
    models = _models(row.routing, row.model_error)
    router = Router(random.Random(7))

    def run() -> ServedVersion:
        return resolve(row.tenant, models, row.name, row.version, label=row.label,
                       key=row.key, router=router, ready=row.ready)

    if isinstance(row.expect, type):
        with pytest.raises(row.expect, match=row.message):
            run()
        return
    served = run()
    if row.expect == -1:  # the split: the same key always lands on the same version
        assert served.id.version in (1, 3)
        assert all(run() is served for _ in range(20))
    else:
        assert served.id.version == row.expect


def test_the_split_follows_the_weights_over_keys() -> None:
    models = _models(ROUTING)
    router = Router(random.Random(7))
    chosen = [
        resolve(ANONYMOUS, models, "m", "", key=f"user-{i}", router=router)
        .id.version for i in range(2000)
    ]
    share = chosen.count(1) / len(chosen)
    assert set(chosen) == {1, 3} and 0.45 < share < 0.55


def test_a_split_target_that_is_not_ready_is_left_out() -> None:
    models = _models("[labels]\nstable = 1\nlate = 5\n[weights]\nstable = 1\nlate = 99\n")
    router = Router(random.Random(7))
    assert {
        resolve(ANONYMOUS, models, "m", "", key=f"k{i}", router=router).id.version
        for i in range(200)
    } == {1}
