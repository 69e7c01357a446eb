"""SIGTERM to `dgemma serve` under load: every call in flight completes with its full output, new calls are
still served during the drain window and refused with UNAVAILABLE after it, and the process exits 0."""

from __future__ import annotations

import signal
import threading
import time

import grpc

from service.api.diffusiongemma.v1 import diffusiongemma_pb2 as pb
from tests.e2e.conftest import Serve

STREAMS, UNARY, DRAIN_S, TOKENS = 6, 2, 1.0, 256
LONG = pb.GenerateRequest(text="def ", max_new_tokens=TOKENS, options=pb.GenerationOptions(
    parameters=pb.DiffusionParameters(max_denoising_steps=10, confidence_threshold=0.0)))


def test_sigterm_under_load_drains_then_refuses_and_exits_0(tmp_path):
    srv = Serve(tmp_path, {"NIM_SHUTDOWN_DRAIN_DELAY": str(DRAIN_S), "NIM_SHUTDOWN_GRACE_PERIOD": "60"},
                api_key=None)
    try:
        stub = srv.stub()
        results: list[object] = []
        finished: list[float] = []
        started = threading.Semaphore(0)
        lock = threading.Lock()

        def stream() -> None:
            req = pb.GenerateRequest()
            req.CopyFrom(LONG)
            req.return_drafts = True
            last = None
            try:
                for i, ev in enumerate(stub.GenerateStream(req, timeout=120)):
                    if i == 0:
                        started.release()
                    last = ev
                out = len(last.final.choices[0].token_ids)
            except grpc.RpcError as e:
                started.release()
                out = e.code()
            with lock:
                results.append(out)
                finished.append(time.monotonic())

        def unary() -> None:
            try:
                out = len(stub.Generate(LONG, timeout=120).choices[0].token_ids)
            except grpc.RpcError as e:
                out = e.code()
            with lock:
                results.append(out)
                finished.append(time.monotonic())

        threads = [threading.Thread(target=stream) for _ in range(STREAMS)]
        threads += [threading.Thread(target=unary) for _ in range(UNARY)]
        for t in threads:
            t.start()
        for _ in range(STREAMS):
            assert started.acquire(timeout=60)
        end = time.monotonic() + 30
        while srv.metric("dgemma_front_inflight_requests") < STREAMS + UNARY and time.monotonic() < end:
            time.sleep(0.05)
        assert srv.metric("dgemma_front_inflight_requests") == STREAMS + UNARY

        srv.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        probes: list[tuple[float, grpc.StatusCode]] = []  # new calls after SIGTERM: (seconds since, code)
        while time.monotonic() - sent < DRAIN_S + 10:
            try:
                stub.ListModels(pb.ListModelsRequest(), timeout=2)
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
            probes.append((time.monotonic() - sent, code))
            if code != grpc.StatusCode.OK:
                break
            time.sleep(0.1)
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        assert results == [TOKENS] * (STREAMS + UNARY), results  # every call in flight finished in full
        refused = [t for t, code in probes if code != grpc.StatusCode.OK]
        assert refused and probes[-1][1] == grpc.StatusCode.UNAVAILABLE, probes
        assert refused[0] >= DRAIN_S * 0.9, probes  # served during the drain window, refused after it
        assert all(code == grpc.StatusCode.OK for _, code in probes[:-1])
        assert max(finished) > sent + refused[0], "no call was still in flight when new ones were refused"
        assert srv.proc.wait(60) == 0
        print(f"drain: refused after {refused[0]:.2f} s, last call done at {max(finished) - sent:.2f} s, "
              f"exit at {time.monotonic() - sent:.2f} s")
    finally:
        srv.stop()
