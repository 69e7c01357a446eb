"""The public fronts in one process: the gRPC server (diffusiongemma.v1) and the OpenAI-compatible HTTP API,
both over the request layer (service.request)."""
