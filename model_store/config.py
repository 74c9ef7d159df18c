"""Turns a Triton model configuration (config.pbtxt text, or a ModelConfig message derived
from a model file) into a ModelSpec, rejecting what the gateway cannot serve."""

from __future__ import annotations

from typing import Any, cast

from google.protobuf import json_format, text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from model_store.datatypes import DataType
from model_store.errors import ModelConfigError
from model_store.spec import (
    DynamicBatchingSpec,
    ModelSpec,
    QueuePolicy,
    TensorSpec,
    TimeoutAction,
)
from model_store.version_policy import VersionPolicy
from modelgate_pb import model_config_pb2 as mc


def parse_config_text(text: str, folder_name: str) -> mc.ModelConfig:
    """Parse config.pbtxt. Unknown fields are an error, as in Triton, so a typo does not
    silently change what is served."""
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ModelConfigError(f"config.pbtxt: {exc}") from exc
    if config.name and config.name != folder_name:
        raise ModelConfigError(
            f"config.pbtxt names the model '{config.name}' but its folder is '{folder_name}'"
        )
    config.name = folder_name
    return config


def version_policy_of(config: mc.ModelConfig) -> VersionPolicy:
    """The version policy the config declares (latest 1 when it declares none)."""
    which = config.version_policy.WhichOneof("policy_choice")
    if which == "all":
        return VersionPolicy.all()
    if which == "specific":
        return VersionPolicy.specific(tuple(config.version_policy.specific.versions))
    if which == "latest":
        n = config.version_policy.latest.num_versions
        if n < 1:
            raise ModelConfigError("version_policy latest.num_versions must be >= 1")
        return VersionPolicy.latest(n)
    return VersionPolicy.latest(1)


def spec_from_config(config: mc.ModelConfig) -> ModelSpec:
    """Build the ModelSpec of a parsed config; raises ModelConfigError if it cannot be served."""
    if config.max_batch_size < 0:
        raise ModelConfigError("max_batch_size must be >= 0")
    if not config.input:
        raise ModelConfigError("config declares no input")
    if not config.output:
        raise ModelConfigError("config declares no output")
    inputs = tuple(_tensor(t, "input") for t in config.input)
    outputs = tuple(_tensor(t, "output") for t in config.output)
    for kind, tensors in (("input", inputs), ("output", outputs)):
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise ModelConfigError(f"duplicate {kind} names in config: {names}")
    count = sum(g.count or 1 for g in config.instance_group) if config.instance_group else 1
    batching = _dynamic_batching(config) if config.HasField("dynamic_batching") else None
    if batching is not None and config.max_batch_size == 0:
        raise ModelConfigError("dynamic_batching needs max_batch_size > 0")
    return ModelSpec(
        name=config.name,
        platform=config.platform,
        backend=config.backend,
        max_batch_size=config.max_batch_size,
        inputs=inputs,
        outputs=outputs,
        instance_count=count,
        dynamic_batching=batching,
        parameters={k: v.string_value for k, v in config.parameters.items()},
        default_model_filename=config.default_model_filename or "model.onnx",
        config=config.SerializeToString(deterministic=True),
    )


def config_text(config: Message) -> str:
    """Render a ModelConfig as config.pbtxt text (used for derived configs and tools)."""
    return text_format.MessageToString(config)


def config_document(serialized: bytes) -> dict[str, Any]:
    """A serialized ModelConfig as the JSON document Triton's REST API answers (field names
    as in config.pbtxt, default values left out). Protobuf's JSON mapping writes 64-bit
    integers as strings; Triton turns them back into numbers, and clients rely on it
    (``np.zeros(config["input"][0]["dims"])``), so this does too."""
    document: dict[str, Any] = json_format.MessageToDict(
        mc.ModelConfig.FromString(serialized), preserving_proto_field_name=True
    )
    _numbers_of_64_bits(document, cast(Descriptor, mc.ModelConfig.DESCRIPTOR))
    return document


_INT64_TYPES = frozenset({
    FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64,
})


def _numbers_of_64_bits(document: dict[str, Any], descriptor: Descriptor) -> None:
    """Turn, in place, the 64-bit integer strings of ``document`` (a message of
    ``descriptor`` as MessageToDict wrote it) into ints, through nested messages, repeated
    fields and maps."""
    for name, value in document.items():
        field = descriptor.fields_by_name.get(name)
        if field is None:
            continue
        kind = field.message_type
        if kind is not None and kind.GetOptions().map_entry:
            entry = kind.fields_by_name["value"]
            for key, item in value.items():
                value[key] = _converted(item, entry)
        elif field.is_repeated:
            document[name] = [_converted(item, field) for item in value]
        else:
            document[name] = _converted(value, field)


def _converted(value: Any, field: FieldDescriptor) -> Any:
    if field.type in _INT64_TYPES:
        return int(value)
    if field.message_type is not None and isinstance(value, dict):
        _numbers_of_64_bits(value, field.message_type)
    return value


def _tensor(t: mc.ModelInput | mc.ModelOutput, kind: str) -> TensorSpec:
    if not t.name:
        raise ModelConfigError(f"an {kind} has no name")
    try:
        datatype = DataType.from_config(mc.DataType.Name(t.data_type))
    except ValueError as exc:
        raise ModelConfigError(f"{kind} '{t.name}': {exc}") from exc
    if any(d < -1 or d == 0 for d in t.dims):
        raise ModelConfigError(
            f"{kind} '{t.name}': dims must be positive or -1, got {list(t.dims)}"
        )
    if t.HasField("reshape"):
        raise ModelConfigError(f"{kind} '{t.name}': reshape is not supported by modelgate")
    return TensorSpec(name=t.name, datatype=datatype, dims=tuple(t.dims))


def _queue_policy(p: mc.ModelQueuePolicy) -> QueuePolicy:
    action = TimeoutAction.DELAY if p.timeout_action == mc.ModelQueuePolicy.DELAY else (
        TimeoutAction.REJECT
    )
    return QueuePolicy(
        max_queue_size=p.max_queue_size,
        default_timeout_us=p.default_timeout_microseconds,
        allow_timeout_override=p.allow_timeout_override,
        timeout_action=action,
    )


def _dynamic_batching(config: mc.ModelConfig) -> DynamicBatchingSpec:
    db = config.dynamic_batching
    preferred = tuple(sorted(set(db.preferred_batch_size)))
    if any(p < 1 or p > config.max_batch_size for p in preferred):
        raise ModelConfigError(
            f"preferred_batch_size {list(preferred)} must lie in 1..max_batch_size "
            f"({config.max_batch_size})"
        )
    levels = db.priority_levels
    if levels and not 1 <= db.default_priority_level <= levels:
        raise ModelConfigError(
            f"default_priority_level must lie in 1..priority_levels ({levels})"
        )
    per_level = {int(k): _queue_policy(v) for k, v in db.priority_queue_policy.items()}
    if any(not 1 <= k <= levels for k in per_level):
        raise ModelConfigError("priority_queue_policy names a level outside 1..priority_levels")
    return DynamicBatchingSpec(
        preferred_batch_sizes=preferred,
        max_queue_delay_us=db.max_queue_delay_microseconds,
        default_queue_policy=_queue_policy(db.default_queue_policy),
        priority_levels=levels,
        default_priority_level=db.default_priority_level,
        priority_queue_policy=per_level,
    )
