"""The public gRPC front: a grpc.aio server in front of Triton."""
