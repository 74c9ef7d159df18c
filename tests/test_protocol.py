"""Protocol tests: generated code is fresh and our schema is wire-identical to Triton's.

Our .proto files carry the same file names as Triton's compiled ones, so protobuf shares
one descriptor-pool entry and both can be imported in one process (the last test checks
that). The descriptor comparisons still read tritonclient's schema in a child interpreter
(``_run_triton``), so they compare what tritonclient alone registers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, text_format

from modelgate_pb import grpc_service_pb2, model_config_pb2

REPO_ROOT = Path(__file__).resolve().parent.parent
GEN_SCRIPT = REPO_ROOT / "scripts" / "gen_protos.py"
GENERATED_DIR = REPO_ROOT / "modelgate_pb"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
PACKAGE = "inference"
SERVICE = "inference.GRPCInferenceService"

FDP = descriptor_pb2.FieldDescriptorProto
_TYPE_NAMES = {number: name for name, number in FDP.Type.items()}
_LABEL_NAMES = {number: name for name, number in FDP.Label.items()}

# Child-process helper: everything that touches tritonclient's generated classes.
# Commands (argv[1]):
#   descriptors  -> stdout: FileDescriptorSet of model_config.proto + grpc_service.proto
#   infer        -> stdin: serialized ModelInferRequest; stdout: JSON describing how
#                   tritonclient's class parsed it, plus its own re-serialization
#   response     -> stdout: a ModelInferResponse built with tritonclient's class
#   config       -> stdin: config.pbtxt text; stdout: tritonclient's serialization
_TRITON_HELPER = r"""
import json, sys
from google.protobuf import descriptor_pb2, text_format
from tritonclient.grpc import model_config_pb2, service_pb2

cmd = sys.argv[1]
if cmd == "descriptors":
    fds = descriptor_pb2.FileDescriptorSet()
    for mod in (model_config_pb2, service_pb2):
        mod.DESCRIPTOR.CopyToProto(fds.file.add())
    sys.stdout.buffer.write(fds.SerializeToString())
elif cmd == "infer":
    req = service_pb2.ModelInferRequest.FromString(sys.stdin.buffer.read())
    out = {
        "text": text_format.MessageToString(req),
        "model_name": req.model_name,
        "model_version": req.model_version,
        "id": req.id,
        "request_params": {k: v.WhichOneof("parameter_choice") for k, v in req.parameters.items()},
        "priority": req.parameters["priority"].uint64_param,
        "inputs": [[t.name, t.datatype, list(t.shape)] for t in req.inputs],
        "outputs": [t.name for t in req.outputs],
        "binary_data": req.outputs[0].parameters["binary_data"].bool_param,
        "raw_input_contents": [r.hex() for r in req.raw_input_contents],
        "fp32_contents": list(req.inputs[1].contents.fp32_contents),
        "reserialized": req.SerializeToString(deterministic=True).hex(),
    }
    json.dump(out, sys.stdout)
elif cmd == "response":
    resp = service_pb2.ModelInferResponse(model_name="m", model_version="2", id="r-1")
    resp.parameters["sequence_end"].bool_param = True
    out = resp.outputs.add(name="OUT", datatype="INT64", shape=[1, 2])
    out.parameters["classification"].int64_param = 3
    resp.raw_output_contents.append((7).to_bytes(8, "little") + (9).to_bytes(8, "little"))
    sys.stdout.buffer.write(resp.SerializeToString(deterministic=True))
elif cmd == "config":
    cfg = text_format.Parse(sys.stdin.read(), model_config_pb2.ModelConfig())
    sys.stdout.buffer.write(cfg.SerializeToString(deterministic=True))
else:
    raise SystemExit(f"unknown command {cmd!r}")
"""


def _run_triton(command: str, stdin: bytes = b"") -> bytes:
    """Run ``_TRITON_HELPER`` in a fresh interpreter and return its stdout."""
    proc = subprocess.run(
        [sys.executable, "-c", _TRITON_HELPER, command],
        input=stdin,
        capture_output=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


# --------------------------------------------------------------------------
# 1. The checked-in generated code matches the .proto files.


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(GEN_SCRIPT), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, f"gen_protos.py failed:\n{proc.stdout}\n{proc.stderr}"

    fresh_dir = tmp_path / "modelgate_pb"
    fresh = {p.name for p in fresh_dir.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}
    checked_in = {p.name for p in GENERATED_DIR.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}
    assert fresh, "gen_protos.py produced no files"
    assert fresh == checked_in, (
        f"generated file set differs; run `make proto`: "
        f"missing={sorted(fresh - checked_in)} stale={sorted(checked_in - fresh)}"
    )
    stale = [
        name
        for name in sorted(fresh)
        if (fresh_dir / name).read_bytes() != (GENERATED_DIR / name).read_bytes()
    ]
    assert not stale, f"modelgate_pb/ is out of date with protos/ ({stale}); run `make proto`"


# --------------------------------------------------------------------------
# 2. Schema comparison against tritonclient's compiled descriptors.

# A flattened schema: full name -> a comparable description of that symbol.
Schema = dict[str, object]


def _describe_field(msg: descriptor_pb2.DescriptorProto, field: FDP) -> tuple[object, ...]:
    oneof = msg.oneof_decl[field.oneof_index].name if field.HasField("oneof_index") else None
    return (
        field.name,
        _TYPE_NAMES[field.type],
        _LABEL_NAMES[field.label],
        field.type_name or None,  # fully qualified (".inference.X") for messages/enums
        oneof,
        field.proto3_optional,
        field.options.packed if field.options.HasField("packed") else None,
    )


def _walk_enum(prefix: str, enum: descriptor_pb2.EnumDescriptorProto, out: Schema) -> None:
    out[f"enum {prefix}.{enum.name}"] = {v.name: v.number for v in enum.value}


def _walk_message(prefix: str, msg: descriptor_pb2.DescriptorProto, out: Schema) -> None:
    full = f"{prefix}.{msg.name}"
    out[f"message {full}"] = {"map_entry": msg.options.map_entry}
    for field in msg.field:
        out[f"field {full}#{field.number}"] = _describe_field(msg, field)
    for oneof in msg.oneof_decl:
        out[f"oneof {full}.{oneof.name}"] = True
    for enum in msg.enum_type:
        _walk_enum(full, enum, out)
    for nested in msg.nested_type:
        _walk_message(full, nested, out)


def _flatten(files: Iterable[descriptor_pb2.FileDescriptorProto]) -> Schema:
    """Flatten every symbol of the given files that lives in package ``inference``."""
    out: Schema = {}
    for file in files:
        if file.package != PACKAGE:
            continue
        for enum in file.enum_type:
            _walk_enum(PACKAGE, enum, out)
        for msg in file.message_type:
            _walk_message(PACKAGE, msg, out)
        for service in file.service:
            full = f"{PACKAGE}.{service.name}"
            out[f"service {full}"] = True
            for method in service.method:
                out[f"method {full}.{method.name}"] = (
                    method.input_type,
                    method.output_type,
                    method.client_streaming,
                    method.server_streaming,
                )
    return out


def _diff(theirs: Schema, ours: Schema) -> list[str]:
    problems: list[str] = []
    for key in sorted(theirs.keys() - ours.keys()):
        problems.append(f"missing in modelgate: {key} = {theirs[key]!r}")
    for key in sorted(ours.keys() - theirs.keys()):
        problems.append(f"extra in modelgate (not in Triton): {key} = {ours[key]!r}")
    for key in sorted(theirs.keys() & ours.keys()):
        if theirs[key] != ours[key]:
            problems.append(f"differs: {key}: triton={theirs[key]!r} modelgate={ours[key]!r}")
    return problems


@pytest.fixture(scope="module")
def triton_files() -> list[descriptor_pb2.FileDescriptorProto]:
    fds = descriptor_pb2.FileDescriptorSet.FromString(_run_triton("descriptors"))
    names = sorted(f.name for f in fds.file)
    assert names == ["grpc_service.proto", "model_config.proto"], names
    return list(fds.file)


def _our_files() -> list[descriptor_pb2.FileDescriptorProto]:
    files = []
    for module in (model_config_pb2, grpc_service_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        files.append(proto)
    return files


def test_schema_matches_triton_exactly(
    triton_files: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    theirs = _flatten(triton_files)
    ours = _flatten(_our_files())
    # Sanity: the walk actually reached the deep corners of both schemas.
    for key in (
        "message inference.ModelOptimizationPolicy.Cuda.GraphSpec.LowerBound.InputEntry",
        "enum inference.ModelInstanceGroup.SecondaryDevice.SecondaryDeviceKind",
        "method inference.GRPCInferenceService.ModelStreamInfer",
    ):
        assert key in theirs
    problems = _diff(theirs, ours)
    assert not problems, "schema differs from Triton's:\n" + "\n".join(problems)


def test_files_declare_only_package_inference() -> None:
    # The reverse check above only looks inside package "inference"; make sure
    # nothing hides elsewhere, and that the files are proto3 like Triton's.
    for file in _our_files():
        assert file.package == PACKAGE, file.name
        assert file.syntax == "proto3", file.name
        assert not file.extension, f"{file.name} declares extensions"


def test_service_methods_and_streaming() -> None:
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == SERVICE
    streaming = {m.name for m in service.methods if m.client_streaming or m.server_streaming}
    assert streaming == {"ModelStreamInfer"}
    stream = service.methods_by_name["ModelStreamInfer"]
    assert stream.client_streaming and stream.server_streaming
    assert stream.output_type.full_name == "inference.ModelStreamInferResponse"
    assert len(service.methods) == 20


# --------------------------------------------------------------------------
# 3. Round trips through tritonclient's classes.


def _sample_request() -> grpc_service_pb2.ModelInferRequest:
    req = grpc_service_pb2.ModelInferRequest(model_name="iris", model_version="3", id="req-42")
    req.parameters["priority"].uint64_param = 2
    req.parameters["timeout"].int64_param = 5_000
    req.parameters["tenant"].string_param = "acme"
    req.parameters["sequence_start"].bool_param = False  # explicit default still travels
    req.parameters["temperature"].double_param = 0.25

    raw = req.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 4])
    raw.parameters["binary_data_size"].int64_param = 32
    typed = req.inputs.add(name="INPUT1", datatype="FP32", shape=[1, 3])
    typed.contents.fp32_contents.extend([1.5, -2.0, 0.0])
    text = req.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(b"\x00hello\xff")

    out = req.outputs.add(name="probabilities")
    out.parameters["binary_data"].bool_param = True
    req.outputs.add(name="label")

    req.raw_input_contents.append(bytes(range(32)))
    return req


def test_infer_request_round_trips_through_tritonclient() -> None:
    req = _sample_request()
    wire = req.SerializeToString(deterministic=True)
    seen = json.loads(_run_triton("infer", wire))

    # tritonclient's class sees every field (unknown fields would be missing
    # from its text rendering) with the same values.
    assert seen["text"] == text_format.MessageToString(req)
    assert seen["model_name"] == "iris"
    assert seen["model_version"] == "3"
    assert seen["id"] == "req-42"
    assert seen["request_params"] == {
        "priority": "uint64_param",
        "timeout": "int64_param",
        "tenant": "string_param",
        "sequence_start": "bool_param",
        "temperature": "double_param",
    }
    assert seen["priority"] == 2
    assert seen["inputs"] == [
        ["INPUT0", "FP32", [2, 4]],
        ["INPUT1", "FP32", [1, 3]],
        ["TEXT", "BYTES", [1]],
    ]
    assert seen["outputs"] == ["probabilities", "label"]
    assert seen["binary_data"] is True
    assert seen["raw_input_contents"] == [bytes(range(32)).hex()]
    assert seen["fp32_contents"] == [1.5, -2.0, 0.0]

    # ...and back: tritonclient's bytes are ours, byte for byte.
    back_wire = bytes.fromhex(seen["reserialized"])
    assert back_wire == wire
    assert grpc_service_pb2.ModelInferRequest.FromString(back_wire) == req


def test_infer_response_from_tritonclient_parses() -> None:
    resp = grpc_service_pb2.ModelInferResponse.FromString(_run_triton("response"))
    assert (resp.model_name, resp.model_version, resp.id) == ("m", "2", "r-1")
    assert resp.parameters["sequence_end"].WhichOneof("parameter_choice") == "bool_param"
    [out] = resp.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("OUT", "INT64", [1, 2])
    assert out.parameters["classification"].int64_param == 3
    assert resp.raw_output_contents[0] == (7).to_bytes(8, "little") + (9).to_bytes(8, "little")


# --------------------------------------------------------------------------
# 4. A Triton config.pbtxt parses into our ModelConfig.

TRITON_CONFIG_PBTXT = """
# Written the way Triton model repositories write them.
name: "resnet"
platform: "onnxruntime_onnx"
backend: "onnxruntime"
max_batch_size: 8
version_policy: { specific: { versions: [1, 3] } }
input [
  {
    name: "INPUT__0"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, 224, 224 ]
    reshape: { shape: [ 1, 3, 224, 224 ] }
  }
]
output [
  {
    name: "OUTPUT__0"
    data_type: TYPE_FP32
    dims: [ 1000 ]
    label_filename: "labels.txt"
  }
]
instance_group [
  { name: "gpu_pool" kind: KIND_GPU count: 2 gpus: [ 0, 1 ] },
  {
    kind: KIND_CPU
    count: 1
    rate_limiter { resources [ { name: "R1" count: 2 } ] priority: 1 }
  }
]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
  preserve_ordering: true
  priority_levels: 3
  default_priority_level: 2
  default_queue_policy {
    timeout_action: DELAY
    default_timeout_microseconds: 50000
    allow_timeout_override: true
    max_queue_size: 64
  }
  priority_queue_policy {
    key: 1
    value: { timeout_action: REJECT default_timeout_microseconds: 1000 max_queue_size: 8 }
  }
  priority_queue_policy [
    { key: 3 value: { max_queue_size: 4 } }
  ]
}
optimization {
  graph { level: 1 }
  priority: PRIORITY_MAX
  execution_accelerators {
    gpu_execution_accelerator : [
      { name : "tensorrt" parameters { key: "precision_mode" value: "FP16" } }
    ]
  }
  input_pinned_memory { enable: false }
  cuda {
    graphs: true
    graph_spec [ { batch_size: 4 input { key: "INPUT__0" value { dim: [3, 224, 224] } } } ]
  }
}
parameters { key: "intra_op_thread_count" value: { string_value: "2" } }
parameters: { key: "execution_mode" value: { string_value: "1" } }
model_warmup [
  {
    name: "zeros"
    batch_size: 1
    count: 2
    inputs { key: "INPUT__0" value: { data_type: TYPE_FP32 dims: [ 3, 224, 224 ] zero_data: true } }
  },
  {
    name: "file"
    inputs {
      key: "INPUT__0"
      value: { data_type: TYPE_FP32 dims: [ 3, 224, 224 ] input_data_file: "raw_input" }
    }
  }
]
model_transaction_policy { decoupled: false }
response_cache { enable: true }
metric_tags { key: "team" value: "vision" }
"""


def test_triton_config_pbtxt_parses() -> None:
    cfg = text_format.Parse(TRITON_CONFIG_PBTXT, model_config_pb2.ModelConfig())
    mc = model_config_pb2

    assert (cfg.name, cfg.platform, cfg.backend, cfg.max_batch_size) == (
        "resnet",
        "onnxruntime_onnx",
        "onnxruntime",
        8,
    )
    assert cfg.version_policy.WhichOneof("policy_choice") == "specific"
    assert list(cfg.version_policy.specific.versions) == [1, 3]

    [inp] = cfg.input
    assert inp.data_type == mc.TYPE_FP32
    assert inp.format == mc.ModelInput.FORMAT_NCHW
    assert list(inp.dims) == [3, 224, 224]
    assert list(inp.reshape.shape) == [1, 3, 224, 224]
    assert cfg.output[0].label_filename == "labels.txt"

    gpu, cpu = cfg.instance_group
    assert (gpu.name, gpu.kind, gpu.count, list(gpu.gpus)) == (
        "gpu_pool",
        mc.ModelInstanceGroup.KIND_GPU,
        2,
        [0, 1],
    )
    assert cpu.kind == mc.ModelInstanceGroup.KIND_CPU
    assert cpu.rate_limiter.resources[0].count == 2

    assert cfg.WhichOneof("scheduling_choice") == "dynamic_batching"
    db = cfg.dynamic_batching
    assert list(db.preferred_batch_size) == [4, 8]
    assert db.max_queue_delay_microseconds == 100
    assert db.preserve_ordering
    assert (db.priority_levels, db.default_priority_level) == (3, 2)
    assert db.default_queue_policy.timeout_action == mc.ModelQueuePolicy.DELAY
    assert db.default_queue_policy.default_timeout_microseconds == 50_000
    assert db.default_queue_policy.allow_timeout_override
    assert db.default_queue_policy.max_queue_size == 64
    assert sorted(db.priority_queue_policy) == [1, 3]
    assert db.priority_queue_policy[1].timeout_action == mc.ModelQueuePolicy.REJECT
    assert db.priority_queue_policy[1].default_timeout_microseconds == 1000
    assert db.priority_queue_policy[3].max_queue_size == 4

    opt = cfg.optimization
    assert opt.graph.level == 1
    assert opt.priority == mc.ModelOptimizationPolicy.PRIORITY_MAX
    [accel] = opt.execution_accelerators.gpu_execution_accelerator
    assert (accel.name, dict(accel.parameters)) == ("tensorrt", {"precision_mode": "FP16"})
    assert opt.HasField("input_pinned_memory") and not opt.input_pinned_memory.enable
    assert list(opt.cuda.graph_spec[0].input["INPUT__0"].dim) == [3, 224, 224]

    assert {k: v.string_value for k, v in cfg.parameters.items()} == {
        "intra_op_thread_count": "2",
        "execution_mode": "1",
    }
    zeros, from_file = cfg.model_warmup
    assert (zeros.name, zeros.batch_size, zeros.count) == ("zeros", 1, 2)
    assert zeros.inputs["INPUT__0"].WhichOneof("input_data_type") == "zero_data"
    assert from_file.inputs["INPUT__0"].input_data_file == "raw_input"
    assert cfg.HasField("model_transaction_policy") and not cfg.model_transaction_policy.decoupled
    assert cfg.response_cache.enable
    assert dict(cfg.metric_tags) == {"team": "vision"}

    # tritonclient parses the same text into the very same bytes.
    theirs = _run_triton("config", TRITON_CONFIG_PBTXT.encode())
    assert theirs == cfg.SerializeToString(deterministic=True)


def test_config_text_round_trips() -> None:
    cfg = text_format.Parse(TRITON_CONFIG_PBTXT, model_config_pb2.ModelConfig())
    again = text_format.Parse(text_format.MessageToString(cfg), model_config_pb2.ModelConfig())
    assert again == cfg


def test_unknown_config_field_is_rejected() -> None:
    with pytest.raises(text_format.ParseError):
        text_format.Parse('name: "m"\nmax_batchsize: 4\n', model_config_pb2.ModelConfig())


def test_tritonclient_and_our_classes_share_one_process() -> None:
    """Identical files under identical names: importing both is fine and the classes are one."""
    from tritonclient.grpc import service_pb2 as triton_pb

    from modelgate_pb import grpc_service_pb2 as ours

    assert ours.ModelInferRequest is triton_pb.ModelInferRequest
