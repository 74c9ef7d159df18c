"""Version routing: routing.toml parsing, labels, the weighted split (10,000 requests within
±3 points), sticky routing keys; and end to end over the real gateway with tritonclient."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from gateway.errors import InvalidRequestError, ModelNotFoundError
from gateway.models.routing import (
    Router,
    RoutingTable,
    choose_weighted,
    label_version,
    requested_target,
    split_point,
    split_version,
)
from gateway.request.headers import request_metadata
from model_store.labels import RoutingConfigError, RoutingSpec, parse_routing
from tests.support import models
from tests.support.gateway import RunningGateway, running_gateway

ROUTING = """
[labels]
stable = 1
canary = 2

[weights]
stable = 70
canary = 30
"""


def table(text: str = ROUTING) -> RoutingTable:
    return RoutingTable.from_spec(parse_routing(text))


# ---- routing.toml ----------------------------------------------------------------------


def test_routing_file_is_parsed_and_resolved() -> None:
    spec = parse_routing(ROUTING + '[shadow]\ntarget = "canary"\nfraction = 0.25\n')
    assert spec.labels == {"stable": 1, "canary": 2}
    assert spec.weights == (("stable", 70.0), ("canary", 30.0))
    resolved = RoutingTable.from_spec(spec)
    assert resolved.weights == ((1, 70.0), (2, 30.0))
    assert (resolved.shadow, resolved.shadow_fraction) == (2, 0.25)


def test_weights_may_name_versions_and_are_sorted_by_version() -> None:
    resolved = table('[labels]\nnew = 5\n[weights]\nnew = 1\n"3" = 3\n"4" = 0\n')
    assert resolved.weights == ((3, 3.0), (5, 1.0))  # zero weights leave the split


def test_empty_routing_file_means_highest_ready_version() -> None:
    assert parse_routing("") == RoutingSpec()
    assert table("").weights == ()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[labels]\n1abc = 1\n", "must match"),
        ("[labels]\nstable = 0\n", "version number >= 1"),
        ("[labels]\nstable = true\n", "version number >= 1"),
        ("[weights]\nnope = 1\n", "neither a label nor a version"),
        ("[labels]\na = 1\n[weights]\na = -1\n", ">= 0"),
        ("[labels]\na = 1\n[weights]\na = 0\n", "at least one weight"),
        ("[routes]\n", "unknown section"),
        ('[shadow]\ntarget = "2"\nfraction = 1.5\n', "0..1"),
        ("[shadow]\nfraction = 0.5\n", "target"),
        ('[shadow]\ntarget = "2"\nshare = 1\n', "target and fraction"),
        ("[labels\n", "not TOML"),
    ],
)
def test_bad_routing_files_are_refused_with_the_reason(text: str, problem: str) -> None:
    with pytest.raises(RoutingConfigError, match=problem):
        parse_routing(text)


# ---- pure routing --------------------------------------------------------------------


def test_weighted_split_is_within_three_points_over_10000_requests() -> None:
    router = Router(random.Random(20261123))
    weights = table().weights
    counts = Counter(choose_weighted(weights, router.point("m", None)) for _ in range(10_000))
    assert abs(counts[1] / 10_000 - 0.70) <= 0.03
    assert abs(counts[2] / 10_000 - 0.30) <= 0.03


def test_weighted_split_by_routing_keys_is_within_three_points_over_10000_keys() -> None:
    weights = table().weights
    counts = Counter(choose_weighted(weights, split_point("m", f"user-{i}")) for i in range(10_000))
    assert abs(counts[1] / 10_000 - 0.70) <= 0.03
    assert abs(counts[2] / 10_000 - 0.30) <= 0.03


def test_sticky_keys_stay_on_one_version() -> None:
    router = Router(random.Random(1))
    weights = table().weights
    for i in range(500):
        key = f"session-{i}"
        first = choose_weighted(weights, router.point("m", key))
        assert all(choose_weighted(weights, router.point("m", key)) == first for _ in range(5))
    # The point depends on the model too, so one key is not pinned to one side everywhere.
    assert split_point("a", "k") != split_point("b", "k")
    assert 0 <= split_point("a", "k") < 1


def test_raising_the_canary_weight_only_moves_keys_onto_the_canary() -> None:
    before = table("[weights]\n'1' = 90\n'2' = 10\n").weights
    after = table("[weights]\n'1' = 70\n'2' = 30\n").weights
    for i in range(2000):
        point = split_point("m", str(i))
        if choose_weighted(before, point) == 2:
            assert choose_weighted(after, point) == 2


def test_split_leaves_out_targets_that_are_not_ready() -> None:
    routes = table()
    assert {split_version(routes, {1}, p / 10) for p in range(10)} == {1}
    assert split_version(routes, {3}, 0.5) is None  # the caller falls back to highest ready
    assert split_version(routes, {1, 2}, 0.0) == 1
    assert split_version(routes, {1, 2}, 0.99) == 2


def test_labels_and_the_label_metadata_entry() -> None:
    routes = table()
    assert label_version(routes, "m", "canary") == 2
    with pytest.raises(ModelNotFoundError, match="no version label 'beta'"):
        label_version(routes, "m", "beta")
    assert requested_target("", "canary") == "canary"
    assert requested_target("canary", "canary") == "canary"
    assert requested_target("3", None) == "3"
    with pytest.raises(InvalidRequestError, match="disagree"):
        requested_target("stable", "canary")
    # A number and a label naming the same version agree; another number does not.
    assert requested_target("2", "canary", routes.labels) == "canary"
    with pytest.raises(InvalidRequestError, match="disagree"):
        requested_target("1", "canary", routes.labels)
    with pytest.raises(InvalidRequestError, match="disagree"):
        requested_target("2", "canary")  # no labels known: nothing to agree with
    with pytest.raises(InvalidRequestError, match="x-model-label"):
        requested_target("", "9lives")
    assert request_metadata((("x-model-label", "canary"), ("x-routing-key", "u1"),
                             ("other", "x")))[:2] == ("canary", "u1")
    assert request_metadata(None)[:2] == (None, None)


def test_an_overlong_routing_key_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="x-routing-key"):
        Router().point("m", "k" * 1000)


# ---- end to end ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    root = tmp_path_factory.mktemp("store")
    config = models.add_model_config("adder", extra="version_policy: { all {} }\n")
    for version in (1, 2):
        models.write_model(root, "adder", version, models.add_constant(float(version)), config)
    (root / "adder" / "routing.toml").write_text(ROUTING, encoding="utf-8")
    with running_gateway(root) as gw:
        yield gw


def ask(
    client: tc.InferenceServerClient, version: str = "", headers: dict[str, str] | None = None
) -> int:
    """Send x=[0..3]; return the version that answered, checked against the answer itself
    (the version-N model adds N)."""
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    tensor = tc.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("adder", [tensor], model_version=version, headers=headers)
    answered = int(result.get_response().model_version)
    np.testing.assert_array_equal(result.as_numpy("y"), x + answered)
    return answered


def test_labels_in_model_version_and_in_metadata(client: tc.InferenceServerClient) -> None:
    assert ask(client, "stable") == 1
    assert ask(client, "canary") == 2
    assert ask(client, "2") == 2
    assert ask(client, headers={"x-model-label": "canary"}) == 2
    assert ask(client, "stable", headers={"x-model-label": "stable"}) == 1
    assert client.is_model_ready("adder", "canary")
    with pytest.raises(InferenceServerException) as info:
        ask(client, "beta")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as info:
        ask(client, "stable", headers={"x-model-label": "canary"})
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_routing_keys_land_where_the_hash_says_and_stay(
    client: tc.InferenceServerClient,
) -> None:
    weights = table().weights
    seen: Counter[int] = Counter()
    for i in range(60):
        key = f"customer-{i}"
        expected = choose_weighted(weights, split_point("adder", key))
        answers = {ask(client, headers={"x-routing-key": key}) for _ in range(2)}
        assert answers == {expected}
        seen[expected] += 1
    assert set(seen) == {1, 2}


def test_requests_without_key_are_split_between_the_weighted_versions(
    client: tc.InferenceServerClient,
) -> None:
    # A small end-to-end sample: both sides answer (0.7**120 and 0.3**120 are negligible);
    # the proportions themselves are checked on 10,000 draws above.
    assert {ask(client) for _ in range(120)} == {1, 2}


def test_moving_a_label_applies_without_reloading(gateway: RunningGateway) -> None:
    manager = gateway.gateway.manager
    before = {n: v.runtime for n, v in manager.model("adder").versions.items()}
    store = gateway.gateway.settings.store
    (store / "adder" / "routing.toml").write_text(
        "[labels]\nstable = 2\ncanary = 2\n", encoding="utf-8"
    )
    try:
        gateway.call(manager.reconcile(["adder"]))
        with tc.InferenceServerClient(gateway.target) as c:
            assert ask(c, "stable") == 2
            assert {ask(c) for _ in range(20)} == {2}  # no weights: highest ready version
        after = {n: v.runtime for n, v in manager.model("adder").versions.items()}
        assert after == before  # the same runtimes: nothing was reloaded
    finally:
        (store / "adder" / "routing.toml").write_text(ROUTING, encoding="utf-8")
        gateway.call(manager.reconcile(["adder"]))


def test_a_broken_routing_file_keeps_the_previous_routing(gateway: RunningGateway) -> None:
    manager = gateway.gateway.manager
    path: Path = gateway.gateway.settings.store / "adder" / "routing.toml"
    path.write_text("[labels]\nstable = 'one'\n", encoding="utf-8")
    try:
        gateway.call(manager.reconcile(["adder"]))
        assert manager.model("adder").routing == table()
    finally:
        path.write_text(ROUTING, encoding="utf-8")
        gateway.call(manager.reconcile(["adder"]))
