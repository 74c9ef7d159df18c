"""Classification labels: the file an output's ``label_filename`` names in its model folder,
one label per line (line i names class i), read into that output's TensorSpec."""

from __future__ import annotations

import stat
from dataclasses import replace
from pathlib import Path
from typing import Final

from model_store.errors import ModelConfigError
from model_store.spec import ModelSpec
from modelgate_pb import model_config_pb2 as mc

# Label files are a few thousand short lines; a bound keeps a stray file from being read
# whole into every served version.
MAX_LABEL_BYTES: Final = 16 * 1024 * 1024


def with_class_labels(spec: ModelSpec, config: mc.ModelConfig, folder: Path) -> ModelSpec:
    """``spec`` with the labels of every output whose config names a label_filename;
    raises ModelConfigError when such a file is not a readable file of the model folder."""
    named = {o.name: o.label_filename for o in config.output if o.label_filename}
    if not named:
        return spec
    outputs = tuple(
        replace(t, labels=read_labels(folder, named[t.name])) if t.name in named else t
        for t in spec.outputs
    )
    return replace(spec, outputs=outputs)


def read_labels(folder: Path, filename: str) -> tuple[str, ...]:
    """The labels in ``folder/filename``. The name must be a plain file name of the model
    folder (as Triton resolves it), so a config cannot point at files elsewhere."""
    if "/" in filename or "\\" in filename or filename in (".", ".."):
        raise ModelConfigError(
            f"label_filename '{filename}' must name a file in the model folder"
        )
    path = folder / filename
    try:
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode):
            raise ModelConfigError(f"label_filename '{filename}' is not a regular file")
        if info.st_size > MAX_LABEL_BYTES:
            raise ModelConfigError(
                f"label file '{filename}' is larger than {MAX_LABEL_BYTES} bytes"
            )
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelConfigError(f"label file '{filename}' does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelConfigError(f"cannot read label file '{filename}': {exc}") from exc
    return tuple(text.splitlines())
