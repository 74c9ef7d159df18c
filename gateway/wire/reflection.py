"""gRPC server reflection under both names clients use: grpc.reflection.v1 (grpcurl, Postman
and current grpc tools) and grpc.reflection.v1alpha (older tools), one servicer behind both."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

import grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

V1_SERVICE: Final = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE: Final = reflection.SERVICE_NAME
_V1_FILE: Final = "grpc/reflection/v1/reflection.proto"
_V1ALPHA_PACKAGE: Final = ".grpc.reflection.v1alpha."


def _add_v1_descriptor() -> None:
    """Put grpc.reflection.v1's file in the default pool, so reflection can describe itself
    under that name too. grpcio-reflection ships only v1alpha; v1 is the same proto (the
    same messages and field numbers) in another package, so the file is v1alpha's renamed."""
    pool = reflection_pb2.DESCRIPTOR.pool  # the default pool, where the services live
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = _V1_FILE
    proto.package = "grpc.reflection.v1"

    def renamed(type_name: str) -> str:
        if type_name.startswith(_V1ALPHA_PACKAGE):
            return ".grpc.reflection.v1." + type_name[len(_V1ALPHA_PACKAGE):]
        return type_name

    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):  # setting it, even to '', would mark it present
                field.type_name = renamed(field.type_name)
    for service in proto.service:
        for method in service.method:
            method.input_type = renamed(method.input_type)
            method.output_type = renamed(method.output_type)
    pool.Add(proto)


def add_reflection(server: Any, services: Iterable[str]) -> None:
    """Serve reflection of ``services`` (and of itself, under both names) on ``server``
    (the edge, which wraps the handlers like every other method's)."""
    _add_v1_descriptor()
    servicer = ReflectionServicer((*services, V1ALPHA_SERVICE, V1_SERVICE))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    # The v1 messages are byte for byte the v1alpha ones: the same (de)serializers serve.
    handlers = {"ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE, handlers),))
    server.add_registered_method_handlers(V1_SERVICE, handlers)
