"""gRPC server reflection under both of its names: grpc.reflection.v1 (what grpcurl and current tools ask
first) and v1alpha (older ones). grpcio-reflection ships only v1alpha; v1's messages are the same on the wire,
so one servicer answers both."""

from __future__ import annotations

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1 = "grpc.reflection.v1.ServerReflection"
V1ALPHA = reflection.SERVICE_NAME


def enable_reflection(server: grpc.aio.Server, service_names: list[str]) -> None:
    """Reflection of `service_names` (and of reflection itself, under both names) on `server`."""
    servicer = reflection.aio.ReflectionServicer([*service_names, V1, V1ALPHA])
    handler = {"ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)}
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(name, handler) for name in (V1, V1ALPHA)])
