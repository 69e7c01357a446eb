"""Server reflection answers under grpc.reflection.v1 (grpcurl asks it first) and v1alpha."""

import asyncio

import grpc
from grpc_reflection.v1alpha import reflection_pb2

from service.api.diffusiongemma.v1 import diffusiongemma_pb2  # noqa: F401 (its descriptors in the pool)
from service.front.reflection import V1, V1ALPHA, enable_reflection


def test_both_reflection_versions_list_the_services_and_describe_them():
    async def run():
        server = grpc.aio.server()
        enable_reflection(server, ["diffusiongemma.v1.DiffusionGemma"])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        seen = {}
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            for name in (V1, V1ALPHA):
                call = ch.stream_stream(f"/{name}/ServerReflectionInfo",
                                        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
                requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                            reflection_pb2.ServerReflectionRequest(
                                file_containing_symbol="diffusiongemma.v1.DiffusionGemma")]
                seen[name] = [r async for r in call(iter(requests))]
        await server.stop(None)
        return seen

    for name, (listed, described) in asyncio.run(run()).items():
        names = {s.name for s in listed.list_services_response.service}
        assert names == {"diffusiongemma.v1.DiffusionGemma", V1, V1ALPHA}, name
        assert described.file_descriptor_response.file_descriptor_proto, name
