import io
import json
import logging

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from service.telemetry.logs import configure_logging, jsonl_from_env


@pytest.fixture
def stream():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out = io.StringIO()
    yield out
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def lines(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_lines_with_trace_ids_extras_and_exceptions(stream):
    configure_logging("info", jsonl=True, stream=stream)
    log = logging.getLogger("dgemma.test")
    log.debug("hidden")
    log.info("outside a span", extra={"request_id": "r-1"})
    ctx = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=False,
                      trace_flags=TraceFlags(1))
    with trace.use_span(NonRecordingSpan(ctx)):
        log.warning("inside %s", "a span", extra={"request_id": "r-2", "tokens": 5, "obj": object()})
        try:
            raise ValueError("bad\nvalue")
        except ValueError:
            log.exception("failed")
    first, second, third = lines(stream)
    assert first["message"] == "outside a span" and first["request_id"] == "r-1"
    assert first["level"] == "INFO" and first["logger"] == "dgemma.test"
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert "trace_id" not in first and "span_id" not in first
    assert second["message"] == "inside a span" and second["tokens"] == 5 and isinstance(second["obj"], str)
    assert second["trace_id"] == "0af7651916cd43dd8448eb211c80319c" and second["span_id"] == "b7ad6b7169203331"
    assert third["exc_type"] == "ValueError" and third["exc_message"] == "bad\nvalue"
    assert "Traceback" in third["traceback"] and third["level"] == "ERROR"
    assert len(stream.getvalue().splitlines()) == 3  # the newline in the message stayed escaped


def test_plain_format_and_reconfiguring_replaces_the_handler(stream):
    configure_logging("DEBUG", jsonl=True, stream=io.StringIO())
    configure_logging("warn", jsonl=False, stream=stream)
    assert logging.getLogger().level == logging.WARNING
    logging.getLogger("dgemma.test").info("hidden")
    logging.getLogger("dgemma.test").warning("shown")
    text = stream.getvalue()
    assert text.count("\n") == 1 and "WARNING dgemma.test: shown" in text
    assert sum(getattr(h, "_dgemma_handler", False) for h in logging.getLogger().handlers) == 1


def test_jsonl_from_env(stream, monkeypatch):
    for v, expected in [("1", True), ("true", True), ("YES", True), ("0", False), ("", False), ("no", False)]:
        monkeypatch.setenv("NIM_JSONL_LOGGING", v)
        assert jsonl_from_env() is expected
    monkeypatch.setenv("NIM_JSONL_LOGGING", "1")
    configure_logging("INFO", stream=stream)
    logging.getLogger("x").info("hello")
    assert lines(stream)[0]["message"] == "hello"
