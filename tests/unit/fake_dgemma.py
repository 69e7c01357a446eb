"""A fake DiffusionGemma gRPC server for client and CLI unit tests: records requests, returns canned replies."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service.api.diffusiongemma.v1 import diffusiongemma_pb2 as pb
from service.api.diffusiongemma.v1 import diffusiongemma_pb2_grpc as pb_grpc

USAGE = pb.Usage(prompt_tokens=3, completion_tokens=5, total_tokens=8)
STATS = pb.DiffusionStats(decoder_passes=4, steps_per_canvas=[4], tokens_per_forward=1.25)


class FakeServicer(pb_grpc.DiffusionGemmaServicer):
    """Text "fail" aborts with INVALID_ARGUMENT, "slow" sleeps 0.5 s, "endless" streams drafts for 5 s."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object, dict[str, str]]] = []
        self.stream_done = threading.Event()  # set when an endless stream ends, for any reason
        self.stream_completed = False  # the endless stream ran to its end (was not cancelled)

    def _record(self, name: str, request: object, context: grpc.ServicerContext) -> None:
        self.calls.append((name, request, dict(context.invocation_metadata())))
        text = getattr(request, "text", "")
        if text == "fail":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens: must be in [1, 65536], got 0")
        if text == "slow":
            time.sleep(0.5)

    @staticmethod
    def _variations(request: pb.GenerateRequest) -> int:
        return request.options.num_variations or 1

    def _response(self, request: pb.GenerateRequest) -> pb.GenerateResponse:
        choices = [pb.Choice(index=i, text=f"hello {i}", token_ids=[7, 8, 1, 0], finish_reason=pb.FINISH_REASON_EOS,
                             seed=request.options.seed + i, stats=STATS) for i in range(self._variations(request))]
        return pb.GenerateResponse(request_id=request.request_id or "rid", model="fake", choices=choices, usage=USAGE)

    def Generate(self, request, context):
        self._record("Generate", request, context)
        return self._response(request)

    def GenerateStream(self, request, context):
        self._record("GenerateStream", request, context)
        rid = request.request_id or "rid"
        if request.text == "endless":
            context.add_callback(self.stream_done.set)
            for step in range(500):
                yield pb.GenerateStreamResponse(request_id=rid, draft=pb.Draft(step=step + 1, text="x"))
                time.sleep(0.01)
            self.stream_completed = True
            return
        for v in range(self._variations(request)):
            if request.return_drafts:
                for step, text in ((1, "h?l?o"), (2, "hel?o"), (3, f"hello {v}")):
                    yield pb.GenerateStreamResponse(
                        request_id=rid, draft=pb.Draft(variation=v, step=step, text=text, token_ids=[7]))
            yield pb.GenerateStreamResponse(request_id=rid, canvas=pb.CommittedCanvas(variation=v, steps=3,
                                                                                      text=f"hello {v}"))
        yield pb.GenerateStreamResponse(request_id=rid, final=self._response(request))

    def Infill(self, request, context):
        self._record("Infill", request, context)
        return pb.InfillResponse(request_id="rid", choices=[
            pb.InfillChoice(index=0, infill="XX", text=request.prefix + "XX" + request.suffix, stats=STATS)])

    def Edit(self, request, context):
        self._record("Edit", request, context)
        return pb.EditResponse(choices=[pb.EditChoice(text="edited", replacements=["e"])])

    def Template(self, request, context):
        self._record("Template", request, context)
        return pb.TemplateResponse(choices=[
            pb.TemplateChoice(text='{"age": 42}', values=["42"], named_values={"age": "42"})])

    def Tokenize(self, request, context):
        self._record("Tokenize", request, context)
        ids = [2] + [ord(c) for c in request.text]
        return pb.TokenizeResponse(token_ids=ids, tokens=["<bos>", *request.text])

    def Score(self, request, context):
        self._record("Score", request, context)
        ids = list(request.continuation_ids.ids) or [ord(c) for c in request.continuation_text]
        return pb.ScoreResponse(tokens=[pb.ScoredToken(token_id=i, logprob=-1.0) for i in ids],
                                total_logprob=-float(len(ids)), score_samples=request.score_samples or 8)

    def ListModels(self, request, context):
        self._record("ListModels", request, context)
        return pb.ListModelsResponse(models=[pb.ModelInfo(id="tiny", canvas_length=16, vocab_size=512,
                                                          profile="torch-fp32-cpu")])


@contextmanager
def fake_server() -> Iterator[tuple[str, FakeServicer]]:
    """A started server on 127.0.0.1 (any free port), with health: "" SERVING, "down" NOT_SERVING."""
    servicer = FakeServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_DiffusionGemmaServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("down", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


def free_address() -> str:
    """An address nothing listens on (connection refused)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"
