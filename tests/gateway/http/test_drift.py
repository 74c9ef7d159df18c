"""The drift report on the REST port: the metrics port's JSON, behind the key like the other
model routes, and only for models (and versions) the tenant may see."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator

import pytest

from tests.gateway.http.conftest import Answer, rest
from tests.gateway.tenancy.test_tenants import admin, issue
from tests.support import models
from tests.support.gateway import RunningGateway, running_gateway
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

ROWS = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32",
                    "data": [1, 2, 3, 4, 5, 6, 7, 8]}]}


@pytest.fixture(scope="module")
def drift_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningGateway,
                                                                                dict[str, str]]]:
    """``add`` (versions 1 and 2), ``fresh`` (never asked), ``quiet`` (not monitored) and
    ``other``; tenant ``seer`` sees all but ``other``, tenant ``outsider`` only ``other``;
    every inference is sampled."""
    root = tmp_path_factory.mktemp("drift-store")
    models.write_model(root, "add", 1, models.add_constant(1.0), models.add_model_config(
        "add", extra="version_policy: { all { } }\n"))
    models.write_model(root, "add", 2, models.add_constant(10.0), None)
    for name in ("other", "fresh", "quiet"):
        models.write_model(root, name, 1, models.add_constant(1.0),
                           models.add_model_config(name))
    tenants = tmp_path_factory.mktemp("drift-tenants") / "tenants.toml"
    assert admin(tenants, "create", "seer", "--models", "add", "fresh", "quiet")[0] == 0
    assert admin(tenants, "create", "outsider", "--models", "other")[0] == 0
    keys = {"seer": issue(tenants, "seer"), "outsider": issue(tenants, "outsider")}
    with running_gateway(root, http_port=0, tenants=tenants, monitoring_sample_every=1,
                         monitoring_max_rows_per_s=0, monitoring_exclude=("quiet",)) as gateway:
        yield gateway, keys


def get(gateway: RunningGateway, path: str, key: str | None) -> Answer:
    return rest(gateway.gateway.rest_port, "GET", path,
                headers={"x-api-key": key} if key else None)


def test_the_drift_report_is_served_to_a_tenant_that_sees_the_model(
    drift_gateway: tuple[RunningGateway, dict[str, str]],
) -> None:
    gateway, keys = drift_gateway
    port = gateway.gateway.rest_port
    for version in ("1", "2"):
        for _ in range(3):
            answer = rest(port, "POST", f"/v2/models/add/versions/{version}/infer", ROWS,
                          {"x-api-key": keys["seer"]})
            assert answer.status == 200, answer.body
    path = "/v2/models/add/versions/1/drift?window=5m"

    def sampled() -> bool:
        answer = get(gateway, path, keys["seer"])
        return answer.status == 200 and answer.json()["samples"]["taken"] >= 3

    wait_until(sampled, "three samples of add/1 in the REST drift report")
    report = get(gateway, path, keys["seer"]).json()
    assert report["model"] == "add" and report["version"] == 1
    assert report["window"]["name"] == "5m"
    # The metrics port answers the same report for the same path.
    url = f"http://127.0.0.1:{gateway.gateway.metrics_port}{path}"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert json.loads(response.read())["samples"] == report["samples"]
    # The model's path: every monitored version the tenant may see.
    wait_until(lambda: len(get(gateway, "/v2/models/add/drift", keys["seer"]).json()
                           .get("versions", [])) == 2, "both versions of add reported")
    both = get(gateway, "/v2/models/add/drift", keys["seer"]).json()
    assert both["model"] == "add" and [v["version"] for v in both["versions"]] == [1, 2]


def test_the_drift_report_needs_a_key_and_a_visible_model(
    drift_gateway: tuple[RunningGateway, dict[str, str]],
) -> None:
    gateway, keys = drift_gateway
    path = "/v2/models/add/versions/1/drift"
    assert get(gateway, path, None).status == 401
    assert get(gateway, path, "mg_seer_" + "A" * 40).status == 401
    hidden = get(gateway, path, keys["outsider"])
    unknown = get(gateway, "/v2/models/nothing/versions/1/drift", keys["outsider"])
    assert hidden.status == unknown.status == 404
    # Another tenant's model reads exactly as one that does not exist.
    assert hidden.json()["error"].replace("add", "M") == unknown.json()["error"].replace(
        "nothing", "M")


def test_bad_drift_requests_get_clear_answers(
    drift_gateway: tuple[RunningGateway, dict[str, str]],
) -> None:
    gateway, keys = drift_gateway
    seer = keys["seer"]
    window = get(gateway, "/v2/models/add/versions/1/drift?window=2d", seer)
    assert window.status == 400 and "window must be one of" in window.json()["error"]
    label = get(gateway, "/v2/models/add/versions/stable/drift", seer)
    assert label.status == 400 and "by number" in label.json()["error"]
    missing = get(gateway, "/v2/models/add/versions/7/drift", seer)
    assert missing.status == 404 and "version 7" in missing.json()["error"]
    post = rest(gateway.gateway.rest_port, "POST", "/v2/models/add/drift", {},
                {"x-api-key": seer})
    assert post.status == 405 and post.headers["allow"] == "GET"
    unknown = get(gateway, "/v2/models/nothing/versions/1/drift", seer)
    assert unknown.status == 404 and "'nothing'" in unknown.json()["error"]
    quiet = get(gateway, "/v2/models/quiet/versions/1/drift", seer)
    assert quiet.status == 404
    assert "not monitored" in quiet.json()["error"] and "monitoring_exclude" in quiet.json()[
        "error"]


def test_a_monitored_version_before_its_first_sample_has_a_report_with_0_samples(
    drift_gateway: tuple[RunningGateway, dict[str, str]],
) -> None:
    gateway, keys = drift_gateway
    answer = get(gateway, "/v2/models/fresh/versions/1/drift", keys["seer"])
    assert answer.status == 200, answer.body
    report = answer.json()
    assert report["samples"]["taken"] == 0 and report["window"]["rows"] == 0
    # No profile.json and no earlier version: the report says so, by name.
    assert report["reference"]["kind"] == "none"
    assert "no profile.json" in report["reference"]["reason"]
