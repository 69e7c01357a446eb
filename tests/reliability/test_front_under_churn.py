"""A bounded storm on 127.0.0.1: many clients at once, mixing good calls, bad input, client cancels, short
deadlines and overload. Afterwards nothing is leaked (no live canvas, no queued or in-flight request), the
server is SERVING and answers correctly."""

from __future__ import annotations

import random
import threading
import time

import grpc

from service.api.diffusiongemma.v1 import diffusiongemma_pb2 as pb
from tests.e2e.conftest import Serve

CLIENTS, CALLS_PER_CLIENT, WALL_LIMIT_S = 8, 6, 90
EXPECTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.CANCELLED,
            grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}


def options(steps: int, n: int = 1) -> pb.GenerationOptions:
    return pb.GenerationOptions(parameters=pb.DiffusionParameters(max_denoising_steps=steps), num_variations=n)


def one_call(stub, rng: random.Random) -> grpc.StatusCode:
    kind = rng.choice(["generate", "stream_cancel", "deadline", "bad", "infill", "template", "variations"])
    try:
        if kind == "generate":
            stub.Generate(pb.GenerateRequest(text="def ", max_new_tokens=64, options=options(6)), timeout=60)
        elif kind == "stream_cancel":
            call = stub.GenerateStream(pb.GenerateRequest(text="x", max_new_tokens=640, return_drafts=True,
                                                          options=options(100)), timeout=60)
            for _ in range(rng.randint(1, 5)):
                next(call)
            call.cancel()
            return grpc.StatusCode.CANCELLED
        elif kind == "deadline":
            stub.Generate(pb.GenerateRequest(text="y", max_new_tokens=640, options=options(200)),
                          timeout=rng.uniform(0.05, 0.5))
        elif kind == "bad":
            stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[2, -5])), timeout=30)
        elif kind == "infill":
            stub.Infill(pb.InfillRequest(prefix="a = ", suffix="\n", gap_tokens=3, options=options(4)), timeout=60)
        elif kind == "template":
            stub.Template(pb.TemplateRequest(skeleton='{"n": {{number:2}}}', options=options(4)), timeout=60)
        else:
            stub.Generate(pb.GenerateRequest(text="z", max_new_tokens=64, options=options(6, n=3)), timeout=60)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


def test_front_survives_churn_and_leaks_nothing(tmp_path):
    srv = Serve(tmp_path, {"NIM_MAX_CONCURRENT_REQUESTS": "6"}, api_key=None)
    try:
        codes: list[grpc.StatusCode] = []
        lock = threading.Lock()
        deadline = time.monotonic() + WALL_LIMIT_S

        def client(seed: int) -> None:
            rng = random.Random(seed)
            stub = srv.stub()
            for _ in range(CALLS_PER_CLIENT):
                if time.monotonic() > deadline:
                    return
                code = one_call(stub, rng)
                with lock:
                    codes.append(code)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WALL_LIMIT_S + 30)
        assert not any(t.is_alive() for t in threads)
        assert codes and set(codes) <= EXPECTED, set(codes) - EXPECTED
        assert grpc.StatusCode.OK in codes

        def drained() -> bool:
            return (srv.live_canvases() == 0 and srv.metric("dgemma_front_inflight_requests") == 0
                    and srv.metric("dgemma_front_queue_depth") == 0)

        end = time.monotonic() + 20
        while time.monotonic() < end and not drained():
            time.sleep(0.1)
        assert drained(), (srv.live_canvases(), srv.metric("dgemma_front_inflight_requests"),
                           srv.metric("dgemma_front_queue_depth"), srv.metrics()[-3000:])
        assert srv.health() == "SERVING"
        r = srv.stub().Generate(pb.GenerateRequest(text="def ", max_new_tokens=64, options=options(4)), timeout=60)
        assert len(r.choices[0].token_ids) == 64
        assert srv.metric("dgemma_front_requests_total", code="INTERNAL") is None  # no internal error at all
    finally:
        assert srv.stop() == 0
