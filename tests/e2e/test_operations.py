"""Deadlines, cancellation, overload, auth, health, metrics and traces of a running `dgemma serve`."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from service.api.diffusiongemma.v1 import diffusiongemma_pb2 as pb
from tests.e2e.conftest import MAX_CONCURRENT

# Long enough to still be running when the test acts: many canvases, many steps, no early stop.
LONG = pb.GenerateRequest(text="class ", max_new_tokens=64 * 40, return_drafts=True, options=pb.GenerationOptions(
    parameters=pb.DiffusionParameters(max_denoising_steps=200, confidence_threshold=0.0)))
SHORT = pb.GenerateRequest(text="a", max_new_tokens=8, options=pb.GenerationOptions(
    parameters=pb.DiffusionParameters(max_denoising_steps=4)))


def wait_until(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_short_deadline_is_deadline_exceeded_and_frees_the_backend_slot(server):
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        server.stub().Generate(LONG, metadata=server.metadata(), timeout=1.0)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t0 < 5
    assert wait_until(lambda: server.live_canvases() == 0)
    assert server.stub().Generate(SHORT, metadata=server.metadata(), timeout=60).choices


def test_client_cancel_frees_the_backend_slot(server):
    call = server.stub().GenerateStream(LONG, metadata=server.metadata(), timeout=120)
    try:
        assert next(call).HasField("draft")
        # the gauge is set when the step that sent the draft ends: a loaded machine may show it a bit later
        assert wait_until(lambda: (server.live_canvases() or 0) >= 1)
    finally:
        call.cancel()  # also when an assert fails, so the next test finds the slot free
    assert wait_until(lambda: server.live_canvases() == 0)
    assert server.stub().Generate(SHORT, metadata=server.metadata(), timeout=60).choices


def test_overload_is_resource_exhausted_at_once_and_accepted_work_continues(server):
    calls = [server.stub().GenerateStream(LONG, metadata=server.metadata(), timeout=120)
             for _ in range(MAX_CONCURRENT)]
    try:
        for c in calls:
            assert next(c).HasField("draft")  # all admitted and running
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            server.stub().Generate(SHORT, metadata=server.metadata(), timeout=60)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() - t0 < 2
        assert "retry" in e.value.details()
        assert next(calls[0]).HasField("draft")  # the accepted streams are still served
    finally:
        for c in calls:
            c.cancel()
    assert wait_until(lambda: server.live_canvases() == 0)
    assert server.stub().Generate(SHORT, metadata=server.metadata(), timeout=60).choices


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_auth_missing_or_wrong_token_is_unauthenticated_while_health_stays_open(server, key):
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    for method, request in (("Generate", SHORT), ("ListModels", pb.ListModelsRequest())):
        with pytest.raises(grpc.RpcError) as e:
            getattr(server.stub(), method)(request, metadata=metadata, timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        next(server.stub().GenerateStream(SHORT, metadata=metadata, timeout=10))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert server.health() == "SERVING" and server.health("diffusiongemma.v1.DiffusionGemma") == "SERVING"


def test_metrics_count_requests_by_method_and_code(server):
    before = server.metric("dgemma_front_requests_total", method="Generate", code="OK") or 0.0
    server.stub().Generate(SHORT, metadata=server.metadata(), timeout=60)
    after = server.metric("dgemma_front_requests_total", method="Generate", code="OK")
    assert after == before + 1
    assert server.metric("dgemma_front_request_duration_seconds_count", method="Generate") >= 1
    assert server.metric("dgemma_front_time_to_first_canvas_seconds_count", method="Generate") >= 1
    assert server.metric("dgemma_front_generated_tokens_total", method="Generate") >= 1
    assert server.metric("dgemma_front_steps_per_canvas_count") >= 1
    assert server.metric("dgemma_front_queue_depth") == 0
    with pytest.raises(grpc.RpcError):
        server.stub().Generate(pb.GenerateRequest(text=""), metadata=server.metadata(), timeout=10)
    assert server.metric("dgemma_front_requests_total", method="Generate", code="INVALID_ARGUMENT") >= 1
    # the same endpoint carries Triton's exposition (its own port is bound to 127.0.0.1 only)
    assert server.metric("dgemma_canvases_total") == server.metric("dgemma_canvases_total",
                                                                   port=server.triton_metrics_port) >= 1
    assert server.metric("nv_inference_request_success", model="diffusiongemma") >= 1


def test_one_trace_holds_the_front_span_and_tritons_spans(server, otlp):
    rid = "trace-check-1"
    options = pb.GenerationOptions(parameters=pb.DiffusionParameters(max_denoising_steps=4, confidence_threshold=0))
    r = server.stub().Generate(pb.GenerateRequest(text="a", max_new_tokens=8, request_id=rid, options=options),
                               metadata=server.metadata(), timeout=60)
    assert list(r.choices[0].stats.steps_per_canvas) == [4]
    fronts = otlp.wait_for(lambda s: s.name == "diffusiongemma.v1.DiffusionGemma/Generate"
                           and s.attributes.get("dgemma.request_id") == rid, timeout=20)
    assert fronts, "the front's span never arrived"
    front = fronts[0]
    assert front.service_name == "dgemma-front"

    def triton_spans():  # Triton exports each span as it ends: wait for its request span, a child of ours
        spans = [s for s in otlp.spans()
                 if s.trace_id == front.trace_id and s.service_name == "triton-inference-server"]
        return spans if any(s.parent_span_id == front.span_id for s in spans) else None

    assert wait_until(triton_spans, timeout=20), [(s.name, s.service_name) for s in otlp.spans()][-20:]

    def backend():  # the denoising work, recorded inside the model under one of Triton's spans
        names = {s.name: s for s in otlp.spans() if s.trace_id == front.trace_id}
        if not {"dgemma.generate", "dgemma.prefill", "dgemma.canvas"} <= set(names):
            return None
        return names if names["dgemma.generate"].parent_span_id in {s.span_id for s in triton_spans()} else None

    assert wait_until(backend, timeout=20), sorted({s.name for s in otlp.spans() if s.trace_id == front.trace_id})
    spans = backend()
    assert spans["dgemma.canvas"].attributes["dgemma.steps"] == 4  # the steps this canvas took
    assert spans["dgemma.prefill"].parent_span_id == spans["dgemma.generate"].span_id


def test_concurrent_variations_share_decoder_passes(server):
    r = server.stub().Generate(pb.GenerateRequest(text="for ", max_new_tokens=64, options=pb.GenerationOptions(
        parameters=pb.DiffusionParameters(max_denoising_steps=30, confidence_threshold=0.0), num_variations=3)),
        metadata=server.metadata(), timeout=120)
    assert sum(c.stats.shared_decoder_passes > 0 for c in r.choices) >= 2


def test_health_is_serving_and_parallel_clients_are_served(server):
    assert server.health() == "SERVING"
    results, errors = [], []

    def go():
        try:
            results.append(server.stub().Generate(SHORT, metadata=server.metadata(), timeout=60))
        except grpc.RpcError as e:  # pragma: no cover (reported below)
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(MAX_CONCURRENT)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors and len(results) == MAX_CONCURRENT
