"""``modelgate profile`` (build a version's profile.json from training data, or freeze a
live window as one) and ``modelgate drift`` (a version's drift report as a table, worst
features first, read from a gateway's metrics port)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, TextIO

import numpy as np
import onnxruntime as ort

from gateway.monitoring.profile import (
    LAYOUTS,
    PROFILE_FILE,
    Layout,
    Profile,
    ProfileError,
    dumps,
)
from gateway.monitoring.reference import DEFAULT_BINS, build_profile, profile_from_report
from gateway.monitoring.windows import DEFAULT_WINDOW, WINDOWS
from gateway.settings import SettingsError, load_settings
from model_store.errors import StoreError
from model_store.repository import ModelRepository
from model_store.spec import ModelSpec
from runtimes.base import Tensor
from runtimes.errors import ModelLoadError
from runtimes.onnx_runtime import OnnxOptions, providers_for, session_options

DEFAULT_URL: Final = "http://127.0.0.1:8002"
_TIMEOUT_S: Final = 30.0
_RUN_CHUNK: Final = 256


class CommandError(Exception):
    """A problem the command reports in one line (exit code 2)."""


def add_parsers(commands: Any) -> None:
    """Add ``profile`` and ``drift`` to the top-level CLI's subparsers."""
    profile = commands.add_parser(
        "profile", help="write a model version's reference profile (profile.json)")
    profile.add_argument("model")
    profile.add_argument("version", type=int)
    profile.add_argument("--store", type=Path, required=True, help="the model store folder")
    source = profile.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path,
                        help="reference rows: .npz (one array per input name), .npy (the "
                             "model's one input) or .csv (numbers; the one 2-D input)")
    source.add_argument("--from-url", metavar="URL",
                        help="freeze the live window of a gateway's metrics port instead")
    profile.add_argument("--window", default="1h", choices=list(WINDOWS),
                         help="the live window --from-url freezes (default 1h)")
    profile.add_argument("--bins", type=int, default=DEFAULT_BINS,
                         help=f"bins per numeric feature, quantile cut (default {DEFAULT_BINS})")
    profile.add_argument("--layout", action="append", default=[], metavar="INPUT=LAYOUT",
                         help=f"features of a rank >= 3 input: {'|'.join(LAYOUTS)} "
                              "(default: channels)")
    profile.add_argument("--no-outputs", action="store_true",
                         help="do not run the model for the outputs' reference")
    profile.add_argument("--force", action="store_true", help="replace an existing profile")
    profile.add_argument("--config", type=Path,
                         help="the gateway's settings file (default: $MODELGATE_CONFIG): the "
                              "model runs with its device and thread settings, as served")
    drift = commands.add_parser("drift", help="print a model's drift report, worst first")
    drift.add_argument("model")
    drift.add_argument("--version", type=int, help="one version (default: every monitored)")
    drift.add_argument("--url", default=DEFAULT_URL,
                       help=f"the gateway's metrics port (default {DEFAULT_URL})")
    drift.add_argument("--window", default=DEFAULT_WINDOW, choices=list(WINDOWS))
    drift.add_argument("--top", type=int, default=20, help="features shown per version")
    drift.add_argument("--json", action="store_true", help="print the JSON report as is")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Carry out ``profile`` or ``drift``; returns the exit code."""
    out = out or sys.stdout
    try:
        if args.command == "profile":
            path = write_profile(args)
            print(f"wrote {path}", file=out)
            return 0
        return print_drift(args, out)
    except (CommandError, ProfileError, StoreError, ModelLoadError) as exc:
        print(f"modelgate {args.command}: error: {exc}", file=sys.stderr)
        return 2


# ---- profile -----------------------------------------------------------------------------


def write_profile(args: argparse.Namespace) -> Path:
    store = Path(args.store)
    folder = store / str(args.model) / str(args.version)
    if not folder.is_dir():
        raise CommandError(f"{folder} is not a version folder")
    target = folder / PROFILE_FILE
    if target.exists() and not args.force:
        raise CommandError(f"{target} exists; --force replaces it")
    if args.from_url:
        url = f"{args.from_url.rstrip('/')}/v2/models/{args.model}/versions/{args.version}" \
              f"/drift?window={args.window}"
        profile = profile_from_report(
            fetch(url), source=f"live window {args.window} of {args.from_url}")
    else:
        profile = profile_from_data(store, args.model, args.version, args.data,
                                    layouts=_layouts(args.layout), bins=args.bins,
                                    outputs=not args.no_outputs,
                                    options=serving_options(args.config, os.environ))
    # Written beside and renamed: a polling store never sees half a file.
    partial = target.with_name(f".{PROFILE_FILE}.partial")
    partial.write_text(dumps(profile), encoding="utf-8")
    os.replace(partial, target)
    return target


def _layouts(items: list[str]) -> dict[str, Layout]:
    layouts: dict[str, Layout] = {}
    for item in items:
        name, _, layout = item.partition("=")
        if layout not in LAYOUTS:
            raise CommandError(f"--layout {item}: expected INPUT={'|'.join(LAYOUTS)}")
        layouts[name] = layout  # type: ignore[assignment]  # checked just above
    return layouts


def serving_options(config: Path | None, environ: Mapping[str, str]) -> OnnxOptions:
    """The ONNX Runtime options the gateway serves with, from the same settings file and
    MODELGATE_* variables the gateway reads."""
    if config is None and environ.get("MODELGATE_CONFIG"):
        config = Path(environ["MODELGATE_CONFIG"])
    try:
        settings = load_settings(config, environ, {})
    except SettingsError as exc:
        raise CommandError(str(exc)) from exc
    return OnnxOptions(device=settings.device, intra_op_threads=settings.intra_op_threads,
                       inter_op_threads=settings.inter_op_threads)


def profile_from_data(store: Path, model: str, version: int, data: Path, *,
                      layouts: Mapping[str, Layout], bins: int, outputs: bool,
                      options: OnnxOptions | None = None) -> Profile:
    """The profile of reference rows ``data`` for a version of the store, outputs from
    running the version's ONNX model on them (as served: ``options``) unless ``outputs``
    is False. Features are named by the data (a CSV header, an .npz's ``<input>.names``),
    else by the config's class labels, else by index."""
    stored = ModelRepository(store).scan().get(model)
    if stored is None or stored.spec is None:
        problem = stored.error if stored is not None else "no such model folder"
        raise CommandError(f"model '{model}' in {store}: {problem}")
    spec = stored.spec
    inputs, names = read_inputs(data, spec)
    produced = run_model(store / model / str(version) / spec.default_model_filename, inputs,
                         spec, options or OnnxOptions()) if outputs else {}
    for tensor in (*spec.inputs, *spec.outputs):
        if tensor.labels and tensor.name not in names:
            names[tensor.name] = [f"{tensor.name}[{label}]" for label in tensor.labels]
    return build_profile(inputs, produced, layouts=layouts, bins=bins, names=names,
                         source=f"{data.name} ({_rows(inputs)} rows)")


def read_inputs(data: Path, spec: ModelSpec) -> tuple[dict[str, Tensor], dict[str, list[str]]]:
    """The reference inputs by name, as the spec's datatypes, and the names of their
    columns where the file gives them: a CSV's header, an .npz's ``<input>.names``."""
    names = [t.name for t in spec.inputs]
    columns: dict[str, list[str]] = {}
    try:
        if data.suffix == ".npz":
            with np.load(data, allow_pickle=False) as archive:
                missing = [n for n in names if n not in archive.files]
                if missing:
                    raise CommandError(f"{data.name} lacks input(s) {', '.join(missing)} "
                                       f"(has {', '.join(archive.files)})")
                arrays = {n: np.asarray(archive[n]) for n in names}
                columns = {n: [str(c) for c in np.asarray(archive[f"{n}.names"]).reshape(-1)]
                           for n in names if f"{n}.names" in archive.files}
        elif data.suffix in (".npy", ".csv"):
            if len(names) != 1:
                raise CommandError(f"the model has {len(names)} inputs; give a .npz with "
                                   f"one array per input ({', '.join(names)})")
            if data.suffix == ".csv":
                array, header = _csv(data)
                columns = {names[0]: header} if header else {}
            else:
                array = np.load(data, allow_pickle=False)
            arrays = {names[0]: array}
        else:
            raise CommandError(f"{data.name}: expected a .npz, .npy or .csv file")
    except (OSError, ValueError) as exc:
        raise CommandError(f"cannot read {data}: {exc}") from exc
    typed: dict[str, Tensor] = {}
    for tensor in spec.inputs:
        array = arrays[tensor.name]
        if array.ndim == len(tensor.dims) and spec.batched:  # one feature per row
            array = array.reshape(-1, *[d if d > 0 else -1 for d in tensor.dims])
        typed[tensor.name] = array.astype(tensor.datatype.numpy_dtype, copy=False)
    return typed, columns


def _csv(path: Path) -> tuple[Tensor, list[str]]:
    """The CSV's numbers and its header's column names (none when the first row is
    numbers too)."""
    with path.open(encoding="utf-8") as handle:
        first = handle.readline()
    cells = [v.strip() for v in first.strip().split(",")]
    try:
        [float(v) for v in cells]
        header: list[str] = []
    except ValueError:
        header = cells
    return np.atleast_2d(np.loadtxt(path, delimiter=",", skiprows=1 if header else 0,
                                    dtype=np.float64)), header


def run_model(path: Path, inputs: Mapping[str, Tensor], spec: ModelSpec,
              options: OnnxOptions) -> dict[str, Tensor]:
    """The declared outputs of the ONNX model at ``path`` for ``inputs``, in chunks, from a
    session opened as the gateway opens its own (options, providers)."""
    try:
        session = ort.InferenceSession(str(path), session_options(options),
                                       providers=list(providers_for(options.device)))
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise CommandError(f"cannot load {path}: {exc}") from exc
    names = [t.name for t in spec.outputs]
    rows = _rows(inputs)
    parts: dict[str, list[Tensor]] = {n: [] for n in names}
    step = min(spec.max_batch_size, _RUN_CHUNK) if spec.batched else 1
    for start in range(0, rows, step):
        feeds = {n: a[start:start + step] if spec.batched else a[start]
                 for n, a in inputs.items()}
        for name, value in zip(names, session.run(names, feeds), strict=True):
            parts[name].append(np.asarray(value) if spec.batched else np.asarray(value)[None])
    return {n: np.concatenate(p) for n, p in parts.items() if p}


def _rows(arrays: Mapping[str, Tensor]) -> int:
    return max((int(a.shape[0]) for a in arrays.values() if a.ndim), default=0)


# ---- drift -------------------------------------------------------------------------------


def fetch(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")
        with contextlib.suppress(ValueError, AttributeError):
            detail = str(json.loads(detail).get("error", detail))
        raise CommandError(f"{url}: HTTP {exc.code}: {detail.strip()}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise CommandError(f"{url}: {exc}") from exc
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise CommandError(f"{url}: not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CommandError(f"{url}: not a drift report")
    return data


def print_drift(args: argparse.Namespace, out: TextIO) -> int:
    path = f"/v2/models/{args.model}" + (
        f"/versions/{args.version}" if args.version is not None else "") + "/drift"
    body = fetch(f"{args.url.rstrip('/')}{path}?window={args.window}")
    if args.json:
        print(json.dumps(body, indent=1, sort_keys=True), file=out)
        return 0
    for report in body.get("versions", [body]):
        out.write(table(report, args.top))
    return 0


def _band(feature: Mapping[str, Any]) -> str:
    band = feature.get("band")
    if band is None:
        return "-"
    if band == "insufficient":
        needed = feature.get("needed")
        have = int((feature.get("live") or {}).get("count") or sum(feature.get("counts", ())))
        return f"insufficient ({have} of {needed})" if needed else \
            "insufficient (reference too small)"
    return str(band)


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def table(report: Mapping[str, Any], top: int) -> str:
    """A version's report as text: a heading, then one line per feature, worst first."""
    window, reference, summary = report["window"], report["reference"], report["summary"]
    lines = [
        f"{report['model']} version {report['version']}: window {window['name']} "
        f"({window['rows']} rows), reference {reference['kind']}"
        + (f" ({reference['source']})" if reference.get("source") else "")
        + (f", built from {reference['built_from']}" if reference.get("built_from") else "")
        + (f": {reference['reason']}" if reference.get("reason") else ""),
        f"  {summary['features']} features, {summary['scored']} scored; PSI max "
        f"{_num(summary['psi_max'])}, mean {_num(summary['psi_mean'])}",
    ]
    bands = summary.get("bands") or {}
    if bands:
        lines.append("  bands: " + ", ".join(f"{n} {b}" for b, n in bands.items() if n))
    rows = [("feature", "psi", "bound", "band", "js", "ks", "live mean", "ref mean", "nan",
             "unseen")]
    for feature in report["features"][:top]:
        live, ref = feature["live"], feature.get("reference") or {}
        rows.append((feature["name"], _num(feature["psi"]), _num(feature.get("bound")),
                     _band(feature), _num(feature["js"]), _num(feature["ks"]),
                     _num(live.get("mean")),
                     _num(ref.get("mean")), _num(live.get("nan")),
                     _num(live.get("unseen_share"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    hidden = len(report["features"]) - top
    if hidden > 0:
        lines.append(f"  ... {hidden} more (--top)")
    for comparison in report.get("comparisons", []):
        worst = next((f for f in comparison["features"] if f["psi"] is not None), None)
        lines.append(f"  {comparison['relation']}: version {comparison['version']} vs "
                     f"{comparison['other_version']}"
                     + (f", worst output {worst['name']} PSI {_num(worst['psi'])} "
                        f"({_band(worst)})" if worst else ", not enough live outputs yet"))
    for where, problem in report.get("problems", {}).items():
        lines.append(f"  problem: {where}: {problem}")
    return "\n".join(lines) + "\n\n"
