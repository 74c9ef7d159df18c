"""Synthetic versions for the monitoring tests: a served version of a [batch, features]
model in a temporary store folder, with or without a profile built from reference rows."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from gateway.models.served import ServedVersion
from gateway.monitoring.monitor import Monitor, MonitorConfig
from gateway.monitoring.profile import dumps
from gateway.monitoring.reference import build_profile
from model_store.datatypes import DataType
from model_store.spec import ModelId, ModelSpec, TensorSpec

FEATURES = 4


def spec(name: str = "m", features: int = FEATURES) -> ModelSpec:
    return ModelSpec(
        name=name, platform="onnxruntime_onnx", backend="onnxruntime", max_batch_size=64,
        inputs=(TensorSpec("x", DataType.from_wire("FP32"), (features,)),),
        outputs=(TensorSpec("label", DataType.from_wire("INT64"), (1,)),
                 TensorSpec("scores", DataType.from_wire("FP32"), (3,))),
    )


def version(folder: Path, number: int = 1, name: str = "m",
            features: int = FEATURES) -> ServedVersion:
    (folder / str(number)).mkdir(parents=True, exist_ok=True)
    model = folder / str(number) / "model.onnx"
    model.write_bytes(b"not read by the monitor")
    return ServedVersion(id=ModelId(name, number), spec=spec(name, features), source=model)


def reference_rows(rng: np.random.Generator, rows: int,
                   classes: tuple[float, ...] = (1 / 3, 1 / 3, 1 / 3),
                   features: int = FEATURES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features ~ N(0, 1) (feature i scaled by i + 1), labels with the given class shares,
    and probability rows (a Dirichlet draw)."""
    x = (rng.normal(size=(rows, features)) * (np.arange(features) + 1)).astype(np.float32)
    label = rng.choice(len(classes), size=(rows, 1), p=classes).astype(np.int64)
    scores = rng.dirichlet((2.0, 2.0, 2.0), size=rows).astype(np.float32)
    return x, label, scores


def write_profile(folder: Path, number: int, rng: np.random.Generator, rows: int = 20_000) -> None:
    x, label, scores = reference_rows(rng, rows)
    (folder / str(number)).mkdir(parents=True, exist_ok=True)
    profile = build_profile({"x": x}, {"label": label, "scores": scores}, source="synthetic")
    (folder / str(number) / "profile.json").write_text(dumps(profile), encoding="utf-8")


def every_sample(**overrides: Any) -> Monitor:
    """A monitor that takes every inference, uncapped (no worker thread: tests drain)."""
    return Monitor(dataclasses.replace(MonitorConfig(sample_every=1, max_rows_per_s=0),
                                       **overrides))


def send(monitor: Monitor, served: ServedVersion, x: np.ndarray, label: np.ndarray,
         scores: np.ndarray, *, batch: int = 16) -> None:
    for start in range(0, len(x), batch):
        end = start + batch
        monitor.offer(served, {"x": x[start:end]},
                      {"label": label[start:end], "scores": scores[start:end]},
                      len(x[start:end]))
    monitor.drain()
