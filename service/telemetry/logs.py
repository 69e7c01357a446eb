"""Logging for operators: plain text, or JSON lines (one object per line) when NIM_JSONL_LOGGING is set.

A JSON line has `ts` (ISO-8601 UTC), `level`, `logger`, `message`; `trace_id`/`span_id` of the
current OpenTelemetry span when there is one; every `extra=` field of the call (e.g. `request_id`);
and `exc_type`, `exc_message`, `traceback` when the record carries an exception.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone
from typing import IO, Any

from opentelemetry import trace

_TRUE = {"1", "true", "yes", "on"}
# LogRecord's own attributes: anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_MARK = "_dgemma_handler"


def jsonl_from_env() -> bool:
    """Whether NIM_JSONL_LOGGING asks for JSON lines (1, true, yes, on)."""
    return os.environ.get("NIM_JSONL_LOGGING", "").strip().lower() in _TRUE


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, tz=timezone.utc)
        out: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            out["trace_id"] = format(ctx.trace_id, "032x")
            out["span_id"] = format(ctx.span_id, "016x")
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in out:
                out[key] = _jsonable(value)
        if record.exc_info and record.exc_info[0] is not None:
            out["exc_type"] = record.exc_info[0].__name__
            out["exc_message"] = str(record.exc_info[1])
            out["traceback"] = self.formatException(record.exc_info)
        elif record.stack_info:
            out["stack"] = record.stack_info
        return json.dumps(out, ensure_ascii=False)


def _level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    name = (level or "INFO").strip().upper()
    name = {"WARN": "WARNING", "DEFAULT": "INFO", "TRACE": "DEBUG", "FATAL": "CRITICAL"}.get(name, name)
    value = logging.getLevelName(name)
    return value if isinstance(value, int) else logging.INFO


def configure_logging(level: str | int = "INFO", jsonl: bool | None = None, stream: IO[str] | None = None) -> None:
    """Set up the root logger: one handler to `stream` (stderr), JSON lines or plain text.

    `jsonl=None` reads NIM_JSONL_LOGGING. Calling again replaces the handler installed before.
    """
    if jsonl is None:
        jsonl = jsonl_from_env()
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _HANDLER_MARK, False):
            root.removeHandler(h)
            h.close()  # a StreamHandler leaves its stream open
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if jsonl else logging.Formatter(PLAIN_FORMAT))
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(_level(level))
