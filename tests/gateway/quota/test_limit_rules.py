"""The limit rule registry (gateway/quota/rules.py): what derives from it (the docs' table,
the tenants file, the CLI flags, the shared table's layout), and the map's recipe for a new
limit done once: a toy rule defined here is parsed, offered as a flag and enforced by the
in-process, shared-memory and Redis stores, with nothing else changed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import redis

from gateway.errors import LIMIT_KEY, RETRY_AFTER_KEY, QuotaExceededError
from gateway.quota.redis_store import RedisQuotaStore
from gateway.quota.rules import RULES, PeriodRule
from gateway.quota.shared import SharedQuotaStore
from gateway.quota.store import LIMIT_NAMES, Limits, LocalQuotaStore, QuotaStore, Scope
from gateway.quota.table import MAGIC, QuotaTableError, create_table
from gateway.tenancy.tenants import TenantsFileError, load_tenants, parse_tenants
from tests.gateway.tenancy.test_tenants import admin
from tests.support.redis_server import RedisServer, fresh_redis

DOCS = Path(__file__).resolve().parents[3] / "docs" / "tenants.md"
MINUTE0 = 1_899_999_980.0  # 20 s into a minute of UTC wall time


def test_the_docs_table_of_limits_is_the_registrys() -> None:
    text = DOCS.read_text(encoding="utf-8")
    rows = RULES.docs_table()
    assert "\n".join(rows) in text
    # The trailer's list of limit names names each of them.
    for name in sorted(LIMIT_NAMES):
        assert f"`{name}`" in text, name


def test_every_limit_key_is_a_flag_and_a_file_key(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    flags = []
    for field in RULES.fields():
        flags += ["--" + field.name.replace("_", "-"), "3"]
    code, out = admin(path, "create", "acme", *flags)
    assert code == 0, out
    limits = load_tenants(path)["acme"].limits
    assert dict(limits.items()) == {field.name: 3 for field in RULES.fields()}


def test_streams_is_a_tenant_limit_and_not_a_model_one() -> None:
    tenants = parse_tenants({"tenants": {"acme": {"limits": {"streams": 2}}}})
    acme = tenants["acme"]
    assert acme.stream_scopes() == (Scope("t:acme", Limits(streams=2)),)
    assert acme.scopes("iris") == ()  # a streams limit alone charges no request
    with pytest.raises(TenantsFileError, match="streams is counted per tenant only"):
        parse_tenants({"tenants": {"acme": {"model_limits": {"iris": {"streams": 2}}}}})
    with pytest.raises(TenantsFileError, match="streams must be a positive number"):
        parse_tenants({"tenants": {"acme": {"limits": {"streams": 0}}}})


# The recipe: a new limit is one rule. This one counts requests per UTC minute.
TOY = PeriodRule("requests_per_minute", period_s=60, key="minute", unit="requests",
                 meaning="requests per UTC minute; the count resets at each minute")


@pytest.fixture
def toy() -> Iterator[PeriodRule]:
    RULES.register(TOY)
    try:
        yield TOY
    finally:
        RULES.unregister(TOY.name)


def _over(store: QuotaStore, scopes: tuple[Scope, ...]) -> QuotaExceededError:
    with pytest.raises(QuotaExceededError) as caught:
        asyncio.run(store.admission(scopes, 1))
    return caught.value


def _admit_two_then_refuse(stores: Sequence[QuotaStore], scopes: tuple[Scope, ...]) -> None:
    """Two requests pass (one through each store when there are two); the third is refused
    by the toy limit with its name and the seconds left in the minute."""
    for n in range(2):
        asyncio.run(stores[n % len(stores)].admission(scopes, 1)).release()
    refused = _over(stores[-1], scopes)
    assert refused.trailers[LIMIT_KEY] == "requests_per_minute"
    assert int(refused.trailers[RETRY_AFTER_KEY]) == 40_000


def test_a_toy_limit_is_parsed_offered_as_a_flag_and_named(toy: PeriodRule,
                                                          tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    assert admin(path, "create", "acme", "--requests-per-minute", "2")[0] == 0
    assert load_tenants(path)["acme"].limits == Limits(requests_per_minute=2)
    assert "requests_per_minute" in LIMIT_NAMES
    assert "| `requests_per_minute` | requests per UTC minute" in "\n".join(RULES.docs_table())
    with pytest.raises(TenantsFileError, match="requests_per_minute must be a positive"):
        parse_tenants({"tenants": {"acme": {"limits": {"requests_per_minute": -1}}}})


def test_a_toy_limit_is_enforced_in_process(toy: PeriodRule) -> None:
    store = LocalQuotaStore(wall=lambda: MINUTE0)
    _admit_two_then_refuse([store], (Scope("t:acme", Limits(requests_per_minute=2)),))


def test_a_toy_limit_is_shared_by_workers_and_changes_the_tables_layout(
    toy: PeriodRule, tmp_path: Path,
) -> None:
    table = create_table(2, slots=8, folder=tmp_path)
    try:
        stores = [SharedQuotaStore(table.path, i, wall=lambda: MINUTE0) for i in range(2)]
        _admit_two_then_refuse(stores, (Scope("t:acme", Limits(requests_per_minute=2)),))
        for store in stores:
            asyncio.run(store.close())
        assert table.path.read_bytes()[:8] != MAGIC  # the layout with the toy rule
        RULES.unregister(toy.name)  # a process built without the toy rule ...
        with pytest.raises(QuotaTableError, match="laid out for other limits"):
            SharedQuotaStore(table.path, 0)  # ... refuses to attach rather than misread
    finally:
        table.remove()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from fresh_redis()


def test_a_toy_limit_is_shared_through_redis(toy: PeriodRule,
                                             redis_server: RedisServer) -> None:
    redis_server.flush()

    async def run() -> list[str]:
        stores = [RedisQuotaStore(redis_server.url, wall=lambda: MINUTE0) for _ in range(2)]
        for store in stores:
            await store.start()
        scopes = (Scope("t:acme", Limits(requests_per_minute=2)),)
        try:
            # A lease holds at least one count: two stores can take the two between them.
            for store in stores:
                (await store.admission(scopes, 1)).release()
            codes = []
            for store in stores:
                try:
                    await store.admission(scopes, 1)
                except QuotaExceededError as exc:
                    codes.append(exc.trailers[LIMIT_KEY])
            return codes
        finally:
            for store in stores:
                await store.close()

    assert asyncio.run(run()) == ["requests_per_minute"] * 2
    # Its count lives under the rule's key, per minute.
    client = redis.Redis.from_url(redis_server.url)
    try:
        keys = [k.decode() for k in client.keys("mg:q:*")]
    finally:
        client.close()
    assert f"mg:q:t:acme:minute:{int(MINUTE0 // 60)}" in keys, keys
