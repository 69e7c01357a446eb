import asyncio
import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.telemetry.metrics import FrontMetrics, start_metrics_server, stop_metrics_server


def samples(metrics: FrontMetrics) -> dict:
    text = metrics.exposition().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(metrics, name, **labels):
    return samples(metrics).get((name, tuple(sorted(labels.items()))))


def test_names_are_prefixed_and_registries_separate():
    a, b = FrontMetrics(), FrontMetrics()
    a.request("Generate").finish()
    text = a.exposition().decode()
    for name in ("dgemma_front_requests_total", "dgemma_front_request_duration_seconds",
                 "dgemma_front_time_to_first_canvas_seconds", "dgemma_front_generated_tokens_total",
                 "dgemma_front_steps_per_canvas", "dgemma_front_queue_depth", "dgemma_front_inflight_requests"):
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
    assert value(a, "dgemma_front_requests_total", method="Generate", code="OK") == 1
    assert value(b, "dgemma_front_requests_total", method="Generate", code="OK") is None
    assert "python_gc" not in text  # not the global registry


def test_request_lifecycle():
    m = FrontMetrics()
    r = m.request("Generate")
    assert value(m, "dgemma_front_inflight_requests") == 1 and value(m, "dgemma_front_queue_depth") == 1
    r.first_event()
    r.first_event()  # idempotent
    assert value(m, "dgemma_front_queue_depth") == 0
    r.canvas(steps=24, tokens=256)
    r.canvas(steps=1000, tokens=10)
    r.finish(grpc.StatusCode.OK)
    r.finish(grpc.StatusCode.INTERNAL)  # counted once
    assert value(m, "dgemma_front_inflight_requests") == 0
    assert value(m, "dgemma_front_generated_tokens_total", method="Generate") == 266
    assert value(m, "dgemma_front_time_to_first_canvas_seconds_count", method="Generate") == 1
    assert value(m, "dgemma_front_steps_per_canvas_count") == 2
    assert value(m, "dgemma_front_steps_per_canvas_bucket", le="32.0") == 1
    assert value(m, "dgemma_front_steps_per_canvas_bucket", le="1024.0") == 2
    assert value(m, "dgemma_front_requests_total", method="Generate", code="OK") == 1
    assert value(m, "dgemma_front_requests_total", method="Generate", code="INTERNAL") is None
    assert value(m, "dgemma_front_request_duration_seconds_count", method="Generate") == 1


def test_context_manager_codes():
    m = FrontMetrics()
    with pytest.raises(ValueError):
        with m.request("Generate"):
            raise ValueError
    with pytest.raises(asyncio.CancelledError):
        with m.request("Generate"):
            raise asyncio.CancelledError
    with m.request("Infill") as r:
        r.code = grpc.StatusCode.INVALID_ARGUMENT
    assert value(m, "dgemma_front_requests_total", method="Generate", code="UNKNOWN") == 1
    assert value(m, "dgemma_front_requests_total", method="Generate", code="CANCELLED") == 1
    assert value(m, "dgemma_front_requests_total", method="Infill", code="INVALID_ARGUMENT") == 1
    # never left the queue, yet the gauges are back to zero
    assert value(m, "dgemma_front_queue_depth") == 0 and value(m, "dgemma_front_inflight_requests") == 0


def test_metrics_server_serves_and_stops():
    m = FrontMetrics()
    m.request("Generate").finish("OK")
    port = start_metrics_server(m, "127.0.0.1", 0)
    try:
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        assert 'dgemma_front_requests_total{code="OK",method="Generate"} 1.0' in body
    finally:
        stop_metrics_server(port)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    stop_metrics_server(port)  # no-op


def test_metrics_server_appends_the_backend_exposition_and_survives_its_absence():
    backend = FrontMetrics()  # stands in for Triton's endpoint: another exposition on 127.0.0.1
    backend.inflight.set(7)
    backend_port = start_metrics_server(backend, "127.0.0.1", 0)
    front = FrontMetrics()
    port = start_metrics_server(front, "127.0.0.1", 0, backend_url=f"http://127.0.0.1:{backend_port}/metrics")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert "dgemma_front_inflight_requests 7.0" in resp.read().decode()
        stop_metrics_server(backend_port)  # the backend goes away (a Triton restart): scrapes still work
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
        assert "# backend metrics unavailable" in body and "dgemma_front_inflight_requests 0.0" in body
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/nothing", timeout=5)
    finally:
        stop_metrics_server(port)
        stop_metrics_server(backend_port)
