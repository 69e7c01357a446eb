import logging
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from opentelemetry import trace

from service.telemetry import tracing
from service.telemetry.tracing import (
    BackendSpan,
    context_from_metadata,
    context_from_traceparent,
    emit_span,
    get_tracer,
    record_backend_spans,
    setup_tracing,
    shutdown_tracing,
    traceparent_metadata,
    triton_trace_url,
)
from tests.e2e.otlp_receiver import OtlpReceiver

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def env(monkeypatch):
    """A clean OTEL_* environment; tracing shut down after the test."""
    for key in list(os.environ):
        if key.startswith("OTEL_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    shutdown_tracing()
    yield monkeypatch
    shutdown_tracing(timeout_s=1)  # a failed test may have closed the receiver already


@pytest.fixture
def rx():
    with OtlpReceiver() as receiver:
        yield receiver


def test_off_without_an_endpoint(env):
    assert setup_tracing("dgemma-front") is False
    assert not tracing.tracing_enabled()
    assert triton_trace_url() is None
    with get_tracer("t").start_as_current_span("nothing") as span:
        assert not span.is_recording()


def test_record_backend_spans_is_a_no_op_while_off(env):
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        pytest.skip("an earlier test installed the global provider")
    assert record_backend_spans(TRACEPARENT, [BackendSpan("x", 1, 2)]) == 0


@pytest.mark.parametrize("var,value", [("OTEL_SDK_DISABLED", "true"), ("OTEL_TRACES_EXPORTER", "none")])
def test_disabled_by_the_environment(env, var, value):
    env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    env.setenv(var, value)
    assert setup_tracing("dgemma-front") is False
    assert triton_trace_url() is None


def test_a_span_reaches_the_collector_over_http_protobuf(env, rx):
    env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.url)
    assert setup_tracing("dgemma-front") is True
    assert setup_tracing("other") is True  # idempotent: the first configuration stays
    with get_tracer("test").start_as_current_span("Generate", attributes={"rpc.method": "Generate"}):
        pass
    shutdown_tracing()  # flushes
    (span,) = rx.wait_for(lambda s: s.name == "Generate", timeout=10)
    assert span.service_name == "dgemma-front"
    assert span.attributes["rpc.method"] == "Generate"
    assert re.fullmatch(r"[0-9a-f]{32}", span.trace_id) and span.parent_span_id == ""
    assert rx.requests[0][0] == "application/x-protobuf"


def test_env_overrides_service_name_and_gzip_and_signal_endpoint(env, rx):
    env.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", rx.traces_url)
    env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")  # the signal endpoint wins
    env.setenv("OTEL_SERVICE_NAME", "from-env")
    env.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
    assert setup_tracing("dgemma-front")
    with get_tracer("test").start_as_current_span("x"):
        pass
    shutdown_tracing()
    (span,) = rx.wait_for(lambda s: s.name == "x")
    assert span.service_name == "from-env"
    assert rx.requests[0] == ("application/x-protobuf", "gzip")


def test_grpc_protocol_builds_a_grpc_exporter(env):
    env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    exporter = tracing._otlp_exporter()
    assert "grpc" in type(exporter).__module__
    exporter.shutdown()
    assert setup_tracing("dgemma-front") is True


def test_traceparent_round_trip_and_backend_spans(env, rx):
    env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.url)
    assert traceparent_metadata() == []  # no current span
    setup_tracing("dgemma-front")
    with get_tracer("test").start_as_current_span("front") as front:
        md = traceparent_metadata()
    keys = [k for k, _ in md]
    assert keys == ["traceparent"]
    value = dict(md)["traceparent"]
    fctx = front.get_span_context()
    assert value.startswith(f"00-{fctx.trace_id:032x}-{fctx.span_id:016x}-")
    assert int(value[-2:], 16) & 1  # sampled (the SDK also sets W3C level 2's "random" bit: 03)

    parent = context_from_traceparent(value)
    assert trace.get_current_span(parent).get_span_context().trace_id == fctx.trace_id
    t0 = time.time_ns()
    canvas = emit_span("canvas", t0, t0 + 5_000_000, {"canvas.index": 0, "steps": 12}, parent=parent)
    emit_span("step", t0, t0 + 1000, parent=canvas)
    assert record_backend_spans(value, [BackendSpan("prefill", t0 - 1000, t0, {"tokens": 7}),
                                        BackendSpan("commit", t0 + 5_000_000, t0 + 6_000_000)]) == 2
    emit_span("failed", t0, t0 + 1, parent=value, error="boom")
    shutdown_tracing()

    spans = {s.name: s for s in rx.wait_for(lambda s: True, count=6)}
    front_id = f"{fctx.span_id:016x}"
    for name in ("canvas", "prefill", "commit", "failed"):
        assert spans[name].trace_id == f"{fctx.trace_id:032x}"
        assert spans[name].parent_span_id == front_id, name
    assert spans["step"].parent_span_id == spans["canvas"].span_id
    assert spans["canvas"].attributes == {"canvas.index": 0, "steps": 12}
    assert spans["canvas"].end_ns - spans["canvas"].start_ns == 5_000_000
    assert spans["failed"].status_code == 2


@pytest.mark.parametrize("value", [
    None, "", "garbage", "00-00000000000000000000000000000000-b7ad6b7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01", "{", "{}", '{"traceparent": 5}', "[1]", 42,
])
def test_invalid_traceparents_give_none(value):
    assert context_from_traceparent(value) is None


@pytest.mark.parametrize("value", [
    TRACEPARENT, TRACEPARENT.encode(), f"  {TRACEPARENT} ", '{"traceparent":"%s"}' % TRACEPARENT,
])
def test_valid_traceparents(value):
    ctx = context_from_traceparent(value)
    sc = trace.get_current_span(ctx).get_span_context()
    assert sc.is_remote and f"{sc.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert f"{sc.span_id:016x}" == "b7ad6b7169203331"


def test_context_from_grpc_metadata():
    md = [("user-agent", "x"), ("traceparent", TRACEPARENT.encode()), ("tracestate", "k=v")]
    ctx = context_from_metadata(md)
    sc = trace.get_current_span(ctx).get_span_context()
    assert f"{sc.span_id:016x}" == "b7ad6b7169203331" and sc.trace_state.get("k") == "v"
    assert context_from_metadata([("x", "y")]) is None and context_from_metadata(None) is None
    # with tracing off the client's context still propagates through a non-recording span
    with trace.use_span(trace.NonRecordingSpan(sc)):
        assert dict(traceparent_metadata())["traceparent"] == TRACEPARENT


@pytest.mark.parametrize("envs,expected", [
    ({}, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318"}, "http://otel:4318/v1/traces"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318/"}, "http://otel:4318/v1/traces"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "otel:4318"}, "otel:4318/v1/traces"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "127.0.0.1:5/v1/traces"}, "127.0.0.1:5/v1/traces"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://a:1/custom", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://b:2"},
     "http://a:1/custom"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
     "http://otel:4318/v1/traces"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
      "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}, "http://otel:4317/v1/traces"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318", "OTEL_TRACES_EXPORTER": "console"}, None),
])
def test_triton_trace_url(env, envs, expected):
    for k, v in envs.items():
        env.setenv(k, v)
    assert triton_trace_url() == expected


def test_triton_trace_url_warns_for_grpc(env, caplog):
    env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4317")
    env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with caplog.at_level(logging.WARNING, logger="service.telemetry.tracing"):
        assert triton_trace_url() is None
    assert "OTLP/HTTP" in caplog.text


def test_global_provider_in_a_fresh_process(rx):
    """The global provider is set once per process: check it there, with a tracer taken before setup."""
    code = textwrap.dedent("""
        from opentelemetry import trace
        early = trace.get_tracer("early")  # taken before setup, as module-level code does
        from service.telemetry.tracing import setup_tracing, shutdown_tracing
        assert setup_tracing("dgemma-front")
        with early.start_as_current_span("early-span"):
            pass
        with trace.get_tracer("late").start_as_current_span("late-span"):
            pass
        shutdown_tracing()
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_EXPORTER_OTLP_ENDPOINT=rx.url, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, timeout=60)
    spans = rx.wait_for(lambda s: s.name.endswith("-span"), count=2, timeout=10)
    assert {s.service_name for s in spans} == {"dgemma-front"}
