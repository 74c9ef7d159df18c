"""Warm-up samples for a model version: Triton's ``model_warmup`` blocks from config.pbtxt,
or, when there are none, one batch-1 sample of zeros in every declared input's shape."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError

from model_store.datatypes import DataType
from model_store.errors import ModelConfigError
from model_store.platforms import is_remote
from model_store.spec import ModelSpec
from modelgate_pb import model_config_pb2 as mc

WARMUP_FOLDER: Final = "warmup"
# A warm-up sample is small by nature; a typo in dims must not allocate gigabytes.
_MAX_ELEMENTS: Final = 1 << 24


@dataclass(frozen=True, slots=True)
class WarmupSample:
    """One warm-up request, run ``count`` times; ``rows`` is its batch dimension."""

    name: str
    inputs: dict[str, npt.NDArray[np.generic]]
    rows: int
    count: int


def warmup_samples(spec: ModelSpec, model_folder: Path) -> list[WarmupSample]:
    """The samples to run before a version takes traffic; raises ModelConfigError when a
    declared warm-up cannot be built."""
    try:
        config = mc.ModelConfig.FromString(spec.config) if spec.config else mc.ModelConfig()
    except DecodeError as exc:
        raise ModelConfigError(f"model config of '{spec.name}' is corrupt: {exc}") from exc
    if not config.model_warmup:
        # A remote (Triton) model is warmed by its upstream; a default request at load would
        # only make loading depend on the upstream being up at that moment.
        return [] if is_remote(spec.platform, spec.backend) else [_zeros(spec)]
    return [_declared(spec, w, model_folder) for w in config.model_warmup]


def _zeros(spec: ModelSpec) -> WarmupSample:
    inputs: dict[str, npt.NDArray[np.generic]] = {}
    for tensor in spec.inputs:
        shape = tuple(1 if d == -1 else d for d in spec.full_shape(tensor))
        if spec.batched:
            shape = (1, *shape[1:])
        inputs[tensor.name] = _filled(tensor.datatype, shape)
    return WarmupSample(name="zeros", inputs=inputs, rows=1, count=1)


def _filled(datatype: DataType, shape: tuple[int, ...]) -> npt.NDArray[np.generic]:
    if datatype is DataType.BYTES:
        array = np.empty(shape, dtype=object)
        array.fill(b"")
        return array
    return np.zeros(shape, dtype=datatype.numpy_dtype)


def _declared(spec: ModelSpec, warmup: mc.ModelWarmup, model_folder: Path) -> WarmupSample:
    label = f"model_warmup '{warmup.name}'"
    rows = max(1, warmup.batch_size)
    if spec.batched and rows > spec.max_batch_size:
        raise ModelConfigError(f"{label}: batch_size {rows} exceeds max_batch_size")
    inputs: dict[str, npt.NDArray[np.generic]] = {}
    for name, sample in warmup.inputs.items():
        try:
            declared = spec.input(name)
        except Exception as exc:
            raise ModelConfigError(f"{label}: {exc}") from exc
        try:
            datatype = DataType.from_config(mc.DataType.Name(sample.data_type))
        except ValueError as exc:
            raise ModelConfigError(f"{label}: input '{name}': {exc}") from exc
        if datatype is not declared.datatype:
            raise ModelConfigError(
                f"{label}: input '{name}' is {datatype.value}, the model declares "
                f"{declared.datatype.value}"
            )
        dims = tuple(int(d) for d in sample.dims)
        if any(d < 1 for d in dims):
            raise ModelConfigError(f"{label}: input '{name}' dims must be >= 1")
        shape = (rows, *dims) if spec.batched else dims
        if int(np.prod(shape, dtype=np.int64)) > _MAX_ELEMENTS:
            raise ModelConfigError(f"{label}: input '{name}' is too large for a warm-up")
        kind = sample.WhichOneof("input_data_type")
        if kind == "random_data":
            inputs[name] = _random(datatype, shape)
        elif kind == "input_data_file":
            inputs[name] = _from_file(label, name, datatype, shape, model_folder=model_folder,
                                      file_name=sample.input_data_file)
        else:
            inputs[name] = _filled(datatype, shape)
    missing = [t.name for t in spec.inputs if t.name not in inputs]
    if missing:
        raise ModelConfigError(f"{label}: no sample for input(s) {', '.join(missing)}")
    return WarmupSample(name=warmup.name, inputs=inputs, rows=rows, count=max(1, warmup.count))


def _random(datatype: DataType, shape: tuple[int, ...]) -> npt.NDArray[np.generic]:
    rng = np.random.default_rng(0)
    if datatype is DataType.BYTES:
        return _filled(datatype, shape)
    if datatype is DataType.BOOL:
        return rng.integers(0, 2, shape).astype(np.bool_)
    dtype = datatype.numpy_dtype
    if dtype.kind == "f":
        return rng.random(shape).astype(dtype)
    return rng.integers(0, 100, shape).astype(dtype)


def _from_file(
    label: str, name: str, datatype: DataType, shape: tuple[int, ...], *, model_folder: Path,
    file_name: str,
) -> npt.NDArray[np.generic]:
    # As in Triton, the file lives in <model>/warmup/; a name that walks out is refused.
    folder = (model_folder / WARMUP_FOLDER).resolve()
    path = (folder / file_name).resolve()
    if not path.is_relative_to(folder) or not path.is_file():
        raise ModelConfigError(f"{label}: input '{name}': no file {WARMUP_FOLDER}/{file_name}")
    data = path.read_bytes()
    count = int(np.prod(shape, dtype=np.int64))
    if datatype is DataType.BYTES:
        # Triton's raw BYTES file holds one element repeated for the whole tensor.
        array = np.empty(shape, dtype=object)
        array.fill(data)
        return array
    needed = count * datatype.itemsize
    if len(data) < needed:
        raise ModelConfigError(
            f"{label}: input '{name}': {file_name} has {len(data)} bytes, needs {needed}"
        )
    return np.frombuffer(data[:needed], dtype=datatype.numpy_dtype).reshape(shape).copy()
