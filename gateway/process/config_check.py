"""``modelgate serve --check-config``: everything serving would read at start-up (settings,
model store, routing files, tenants file, TLS files) checked without binding or loading."""

from __future__ import annotations

from pathlib import Path

from gateway.process.tls import CertificateFiles
from gateway.settings import Settings, SettingsError, check_exposure
from gateway.tenancy.tenants import load_tenants
from model_store.errors import StoreError
from model_store.labels import read_routing
from model_store.repository import ModelRepository


class ConfigCheckError(SettingsError):
    """The configuration would not serve as given; the message lists every problem found."""


def store_problems(store: Path) -> tuple[list[str], list[str]]:
    """(problems, models found): what keeps a model of the store from serving (unreadable
    configs, missing model files, broken routing.toml) and one line per model. ONNX files
    are not run (that is loading, not checking)."""
    try:
        models = ModelRepository(store).scan()
    except StoreError as exc:
        return [str(exc)], []
    except OSError as exc:
        return [f"cannot read the store: {exc}"], []
    problems: list[str] = []
    for name, stored in sorted(models.items()):
        if stored.error is not None:
            problems.append(f"model {name}: {stored.error}")
            continue
        for version, reason in sorted(stored.version_errors.items()):
            problems.append(f"model {name} version {version}: {reason}")
        try:
            read_routing(store / name)
        except StoreError as exc:
            problems.append(f"model {name}: {exc}")
    found = [f"model {name}: versions {', '.join(map(str, stored.versions))}"
             for name, stored in sorted(models.items()) if stored.error is None]
    return problems, found


def empty_store_problem(settings: Settings) -> str | None:
    """A store without a model folder serves nothing and would report ready: an error unless
    the settings say models come later (allow_empty_store) or from Triton upstreams."""
    if settings.allow_empty_store or settings.triton:
        return None
    try:
        empty = not any(ModelRepository(settings.store).scan())
    except (StoreError, OSError):
        return None  # reported as what it is by store_problems
    if not empty:
        return None
    return (f"setting 'store': {settings.store} holds no model; copy the model folders there "
            "first, or set allow_empty_store (--allow-empty-store) to start without models")


def check_config(settings: Settings) -> list[str]:
    """Check what ``settings`` (already built and checked by load_settings) points at; returns
    one line per model found, raises ConfigCheckError listing every problem."""
    problems: list[str] = []
    try:
        check_exposure(settings)
    except SettingsError as exc:
        problems.append(str(exc))
    if settings.tenants is not None:
        try:
            load_tenants(settings.tenants)
        except SettingsError as exc:
            problems.append(str(exc))
    if settings.tls_cert is not None and settings.tls_key is not None:
        try:
            CertificateFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        except SettingsError as exc:
            problems.append(f"setting 'tls_cert'/'tls_key': {exc}")
    store, found = store_problems(settings.store)
    problems.extend(f"setting 'store' ({settings.store}): {p}" for p in store)
    empty = empty_store_problem(settings) if not store and not found else None
    if empty is not None:
        problems.append(empty)
    if problems:
        raise ConfigCheckError("\n".join(problems))
    return found
