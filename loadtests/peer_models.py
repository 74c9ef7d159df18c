"""The models the Triton side-by-side runs on both servers: the MLP 64->256->256->10 (batched
and unbatched) and the demo store's small CNN, as one modelgate store and one Triton repository
whose Python-backend models run the same ONNX files with ONNX Runtime (intra-op threads 1)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gateway.settings import demo_store


@dataclass(frozen=True)
class PeerModel:
    """One model both servers serve: its ONNX bytes and config.pbtxt (modelgate's form)."""

    name: str
    onnx_bytes: bytes
    config: str


def mlp(widths: tuple[int, ...] = (64, 256, 256, 10), seed: int = 7) -> bytes:
    """A dense ReLU MLP, input ``x`` FP32 [-1, widths[0]], output ``y`` FP32 [-1, widths[-1]]."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current = "x"
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}")]
        last = i == len(widths) - 2
        out = "y" if last else f"h{i}"
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"],
                                      [out if last else f"g{i}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"g{i}"], [out]))
        current = out
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", widths[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", widths[-1]])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _config(name: str, inputs: str, outputs: str, max_batch: int, delay_us: int | None) -> str:
    batching = (f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}\n"
                if delay_us is not None else "")
    return (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch}\n'
            f"input [ {inputs} ]\noutput [ {outputs} ]\n{batching}"
            "instance_group [ { count: 1 kind: KIND_CPU } ]\n")


MLP_IO: Final = ('{ name: "x" data_type: TYPE_FP32 dims: [ 64 ] }',
                 '{ name: "y" data_type: TYPE_FP32 dims: [ 10 ] }')
CNN_IO: Final = ('{ name: "image" data_type: TYPE_FP32 dims: [ 3, 32, 32 ] }',
                 '{ name: "logits" data_type: TYPE_FP32 dims: [ 10 ] }')
DELAY_US: Final = 500  # the max queue delay both servers batch with


def peer_models() -> list[PeerModel]:
    """mlp (dynamic batching), mlp_unbatched, cnn (dynamic batching)."""
    weights = mlp()
    cnn = (demo_store() / "cnn" / "1" / "model.onnx").read_bytes()
    return [
        PeerModel("mlp", weights, _config("mlp", *MLP_IO, 64, DELAY_US)),
        PeerModel("mlp_unbatched", weights, _config("mlp_unbatched", *MLP_IO, 64, None)),
        PeerModel("cnn", cnn, _config("cnn", *CNN_IO, 32, DELAY_US)),
    ]


def write_store(root: Path, models: list[PeerModel]) -> Path:
    """A modelgate store (<root>/<name>/1/model.onnx and config.pbtxt)."""
    for model in models:
        (root / model.name / "1").mkdir(parents=True, exist_ok=True)
        (root / model.name / "1" / "model.onnx").write_bytes(model.onnx_bytes)
        (root / model.name / "config.pbtxt").write_text(model.config, encoding="utf-8")
    return root


# The opening of a Triton Python-backend model.py that runs <version>/model.onnx with ONNX
# Runtime on one thread; the runner here and the tests' (tests/support/triton_server.py) start
# with it. The backend runs model.py in a stub process that embeds the system libpython with
# an isolated configuration: PYTHONPATH is in its environment but not on sys.path, so the
# model puts it there itself before anything imports numpy.
RUNNER_HEAD: Final = '''
import os, sys
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def open_session(args):
    """The version's model.onnx in ONNX Runtime (one thread), its input and output names."""
    folder = os.path.join(args["model_repository"], args["model_version"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(os.path.join(folder, "model.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    return (session, [i.name for i in session.get_inputs()],
            [o.name for o in session.get_outputs()])
'''

# Triton's Python backend hands execute() every request of a dynamic batch; this runner joins
# their inputs along the batch axis, runs ONNX Runtime once and splits the outputs, as
# modelgate's batcher does (running each request alone would forfeit batching).
BATCHED_RUNNER: Final = RUNNER_HEAD + '''

class TritonPythonModel:
    def initialize(self, args):
        self.session, self.inputs, self.outputs = open_session(args)

    def execute(self, requests):
        parts = {name: [pb_utils.get_input_tensor_by_name(r, name).as_numpy()
                        for r in requests] for name in self.inputs}
        sizes = [len(a) for a in parts[self.inputs[0]]]
        feeds = {name: np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
                 for name, arrays in parts.items()}
        results = self.session.run(self.outputs, feeds)
        responses, start = [], 0
        for size in sizes:
            tensors = [pb_utils.Tensor(name, value[start:start + size])
                       for name, value in zip(self.outputs, results)]
            responses.append(pb_utils.InferenceResponse(tensors))
            start += size
        return responses
'''


def write_triton_repository(root: Path, models: list[PeerModel]) -> Path:
    """A Triton repository serving ``models`` through the Python backend (BATCHED_RUNNER),
    one CPU instance each, with the same batching settings as the modelgate store."""
    for model in models:
        folder = root / model.name / "1"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.onnx").write_bytes(model.onnx_bytes)
        (folder / "model.py").write_text(BATCHED_RUNNER, encoding="utf-8")
        config = model.config.replace('platform: "onnxruntime_onnx"', 'backend: "python"')
        (root / model.name / "config.pbtxt").write_text(config, encoding="utf-8")
    return root
