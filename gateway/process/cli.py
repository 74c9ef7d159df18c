"""The ``modelgate`` command line: ``modelgate serve`` builds the settings from flags,
environment and config file, then runs the gateway."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.monitoring import cli as monitoring_cli
from gateway.process import event_loop
from gateway.process.config_check import check_config, empty_store_problem
from gateway.process.event_loop import EventLoopError
from gateway.process.frontend import BindError
from gateway.process.server import serve
from gateway.process.workers import Supervisor
from gateway.sanitize import escape_log_lines
from gateway.settings import (
    Settings,
    SettingsError,
    check_exposure,
    fields,
    load_settings,
    setting_types,
    worker_count,
)
from gateway.tenancy import admin as tenant_admin
from gateway.tenancy.tenants import load_tenants


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelgate",
        # Plain text: the module docstring is written for readers of the code (RST markup).
        description="Serve versioned models over the KServe V2 / Triton protocol, gRPC and "
                    "HTTP (modelgate serve); manage the tenants file (modelgate tenants); "
                    "build or read drift profiles (modelgate profile, modelgate drift).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="serve a model store over gRPC (and HTTP)")
    run.add_argument("--config", type=Path, help="TOML file with the same settings")
    run.add_argument("--check-config", action="store_true",
                     help="check the settings, model store, tenants and TLS files, then exit "
                     "(0: would serve, 2: what is wrong) without serving")
    kinds = setting_types()
    for f in fields():
        flag = "--" + f.name.replace("_", "-")
        # Flags default to None so the layers below them (env, file, defaults) show through.
        if kinds[f.name].kind is bool:
            run.add_argument(flag, dest=f.name, default=None, help=f.metadata.get("help"),
                             action=argparse.BooleanOptionalAction)
            continue
        if f.metadata.get("repeatable"):  # --triton a=... --triton b=...: a list
            run.add_argument(flag, dest=f.name, default=None, help=f.metadata.get("help"),
                             action="append")
            continue
        run.add_argument(flag, dest=f.name, default=None, help=f.metadata.get("help"))
    tenant_admin.add_parser(commands)
    monitoring_cli.add_parsers(commands)
    return parser


def build_settings(args: argparse.Namespace, environ: dict[str, str]) -> Settings:
    """Settings from parsed flags and an environment (passed in, never read at import)."""
    flags: dict[str, Any] = {f.name: getattr(args, f.name) for f in fields()}
    config = args.config
    if config is None and environ.get("MODELGATE_CONFIG"):
        config = Path(environ["MODELGATE_CONFIG"])
    return load_settings(config, environ, flags)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    args = _parser().parse_args(argv)
    if args.command == "tenants":
        return tenant_admin.run(args, dict(os.environ))
    if args.command in ("profile", "drift"):
        return monitoring_cli.run(args)
    try:
        try:
            settings = build_settings(args, dict(os.environ))
        except SettingsError as exc:
            if not args.check_config or exc.partial is None:
                raise
            # Every problem in one run: the files the valid settings point at too.
            return _check_config(exc.partial, found_before=exc)
        if args.check_config:
            return _check_config(settings)
        # Checked here too so a supervisor stops at once instead of restarting workers.
        check_exposure(settings)
        if settings.tenants is not None:
            load_tenants(settings.tenants)
        empty = empty_store_problem(settings)
        if empty is not None:
            raise SettingsError(empty)
    except SettingsError as exc:
        _print_error(exc)
        return 2
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    escape_log_lines()  # a request field in a message can never start a line of its own
    try:
        count = worker_count(settings)
        if count > 1:
            return Supervisor(settings, count).run()
        return event_loop.run(serve(settings), settings.event_loop)
    except BindError as exc:
        print(f"modelgate: error: setting '{exc.setting}': {exc}", file=sys.stderr)
        return 2
    except (SettingsError, EventLoopError) as exc:  # found at start-up, e.g. a bad tenants file
        _print_error(exc)
        return 2


def _print_error(exc: Exception) -> None:
    """One ``modelgate: error:`` line per problem the exception lists."""
    for line in str(exc).splitlines():
        print(f"modelgate: error: {line}", file=sys.stderr)


def _check_config(settings: Settings, found_before: SettingsError | None = None) -> int:
    """Check what ``settings`` point at; ``found_before``: the settings' own problems (then
    ``settings`` holds defaults in place of the bad values), printed first."""
    # The problems are the command's output; the store scan's own log lines would repeat them.
    logging.disable(logging.CRITICAL)
    try:
        found = check_config(settings)
    except SettingsError as exc:
        if found_before is not None:
            _print_error(found_before)
        _print_error(exc)
        return 2
    if found_before is not None:
        _print_error(found_before)
        return 2
    print(f"modelgate: configuration OK ({len(found)} models)")
    for line in found:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
