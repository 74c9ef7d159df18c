"""Scans a model repository folder into StoredModel entries: each model's spec, the versions
its policy selects and their files, or the reason it cannot be served."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from model_store.class_labels import with_class_labels
from model_store.config import (
    parse_config_text,
    spec_from_config,
    version_policy_of,
)
from model_store.errors import InvalidModelNameError, ModelConfigError, StoreError
from model_store.onnx_graph import complete_config
from model_store.platforms import is_remote
from model_store.spec import ModelSpec, validate_model_name
from modelgate_pb import model_config_pb2 as mc

log = logging.getLogger(__name__)

CONFIG_FILE = "config.pbtxt"


@dataclass(frozen=True, slots=True)
class StoredModel:
    """One model folder as found on disk. ``error`` is set (and ``spec`` is None) when the
    whole model cannot be served; ``version_errors`` holds per-version problems."""

    name: str
    spec: ModelSpec | None
    versions: tuple[int, ...] = ()
    version_files: Mapping[int, Path] = field(default_factory=dict)
    version_errors: Mapping[int, str] = field(default_factory=dict)
    error: str | None = None


class ModelRepository:
    """A model repository rooted at one folder. Models are found only by scanning; a name
    from a request is looked up in the scan, never joined onto a path."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def scan(self) -> dict[str, StoredModel]:
        """Read every model folder. A broken model is reported, never raised, so the rest of
        the store still serves."""
        if not self.root.is_dir():
            raise StoreError(f"model store {self.root} is not a directory")
        models: dict[str, StoredModel] = {}
        for folder in sorted(self.root.iterdir()):
            if not folder.is_dir() or folder.name.startswith("."):
                continue
            try:
                validate_model_name(folder.name)
            except InvalidModelNameError:
                log.warning("ignoring folder %r in the model store: not a valid model name",
                            folder.name)
                continue
            models[folder.name] = self._read_model(folder)
        return models

    def _read_model(self, folder: Path) -> StoredModel:
        name = folder.name
        numbered = _version_folders(folder)
        try:
            config = self._load_config(folder, numbered)
            spec = with_class_labels(spec_from_config(config), config, folder)
            selected = version_policy_of(config).select(numbered)
        except ModelConfigError as exc:
            log.error("model %s is unavailable: %s", name, exc)
            return StoredModel(name=name, spec=None, error=str(exc))
        if not selected:
            return StoredModel(name=name, spec=spec, error="no version folder matches the "
                               "version policy")
        files: dict[int, Path] = {}
        errors: dict[int, str] = {}
        for version in selected:
            path = numbered[version] / spec.default_model_filename
            if path.is_file():
                files[version] = path
            elif is_remote(spec.platform, spec.backend):
                # A remote model has no file here: its version folder may be empty, as a
                # Triton ensemble's is.
                files[version] = path
            else:
                errors[version] = f"model file {spec.default_model_filename} is missing"
        return StoredModel(name=name, spec=spec, versions=selected, version_files=files,
                           version_errors=errors)

    @staticmethod
    def _load_config(folder: Path, numbered: Mapping[int, Path]) -> mc.ModelConfig:
        config_path = folder / CONFIG_FILE
        if config_path.is_file():
            try:
                text = config_path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ModelConfigError(f"cannot read {CONFIG_FILE}: {exc}") from exc
            config = parse_config_text(text, folder.name)
        else:
            config = mc.ModelConfig(name=folder.name)
        if not (config.input and config.output):
            model_file = _newest_model_file(numbered, config.default_model_filename)
            if model_file is None:
                raise ModelConfigError(
                    f"no {CONFIG_FILE} and no version folder with a model file to derive one from"
                )
            complete_config(config, model_file)
        if not config.platform and not config.backend:
            config.platform = "onnxruntime_onnx"
        return config


def _version_folders(folder: Path) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for child in folder.iterdir():
        if child.is_dir() and child.name.isdigit() and not child.name.startswith("0"):
            found[int(child.name)] = child
    return found


def _newest_model_file(numbered: Mapping[int, Path], filename: str) -> Path | None:
    for version in sorted(numbered, reverse=True):
        path = numbered[version] / (filename or "model.onnx")
        if path.is_file():
            return path
    return None
