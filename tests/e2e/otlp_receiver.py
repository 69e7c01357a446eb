"""An in-process OTLP/HTTP trace receiver for tests.

    with OtlpReceiver() as rx:                       # http://127.0.0.1:<ephemeral>
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = rx.url
        ...
        spans = rx.wait_for(lambda s: s.name == "compute", timeout=10)

POST /v1/traces takes `application/x-protobuf` (the Python SDK's exporter) and `application/json`
(Triton's opentelemetry-cpp exporter: camelCase keys, hex ids, 64-bit numbers as strings, as seen
from Triton 2.51), gzip or deflate encoded or not. JSON with snake_case keys or base64 ids (the
protobuf JSON mapping, other exporters) is accepted too.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
import re
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

_HEX = re.compile(r"[0-9a-fA-F]*")


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root span
    name: str
    service_name: str
    attributes: dict[str, Any] = field(default_factory=dict)
    start_ns: int = 0
    end_ns: int = 0
    kind: int = 0
    status_code: int = 0  # 0 unset, 1 ok, 2 error
    events: tuple[str, ...] = ()
    scope: str = ""


# --- decoding ----------------------------------------------------------------------------------

def _id_hex(value: Any) -> str:
    """An OTLP JSON id as hex: hex digits as sent (OTLP JSON spec), or base64 (protobuf JSON mapping)."""
    if not value:
        return ""
    text = str(value)
    if len(text) in (16, 32) and _HEX.fullmatch(text):
        return text.lower()
    try:
        return base64.b64decode(text, validate=True).hex()
    except (binascii.Error, ValueError):
        return text.lower()


def _get(obj: dict[str, Any], camel: str, default: Any = None) -> Any:
    """A field by its camelCase (OTLP JSON) or snake_case (proto field) name."""
    if camel in obj:
        return obj[camel]
    snake = re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), camel)
    return obj.get(snake, default)


def _json_any(v: dict[str, Any] | None) -> Any:
    if not v:
        return None
    for key in ("stringValue", "boolValue", "intValue", "doubleValue", "arrayValue", "kvlistValue", "bytesValue"):
        val = _get(v, key)
        if val is None:
            continue
        if key == "intValue":
            return int(val)
        if key == "doubleValue":
            return float(val)
        if key == "arrayValue":
            return [_json_any(x) for x in val.get("values", [])]
        if key == "kvlistValue":
            return _json_attrs(val.get("values", []))
        if key == "bytesValue":
            return base64.b64decode(val)
        return val
    return None


def _json_attrs(items: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {a["key"]: _json_any(a.get("value")) for a in items or []}


def decode_json(body: bytes) -> list[ReceivedSpan]:
    out = []
    for rs in _get(json.loads(body), "resourceSpans", []):
        resource = _json_attrs((rs.get("resource") or {}).get("attributes"))
        service = str(resource.get("service.name", ""))
        for ss in _get(rs, "scopeSpans", None) or _get(rs, "instrumentationLibrarySpans", []):
            scope = (ss.get("scope") or _get(ss, "instrumentationLibrary", {}) or {}).get("name", "")
            for s in ss.get("spans", []):
                status = s.get("status") or {}
                out.append(ReceivedSpan(
                    trace_id=_id_hex(_get(s, "traceId")), span_id=_id_hex(_get(s, "spanId")),
                    parent_span_id=_id_hex(_get(s, "parentSpanId")), name=s.get("name", ""),
                    service_name=service, attributes=_json_attrs(s.get("attributes")),
                    start_ns=int(_get(s, "startTimeUnixNano", 0)), end_ns=int(_get(s, "endTimeUnixNano", 0)),
                    kind=_enum(s.get("kind", 0)), status_code=_enum(status.get("code", 0)),
                    events=tuple(e.get("name", "") for e in s.get("events", [])), scope=scope,
                ))
    return out


def _enum(v: Any) -> int:
    """An enum as a number or (protobuf JSON mapping) as its name, e.g. SPAN_KIND_SERVER."""
    if isinstance(v, int) or str(v).isdigit():
        return int(v)
    names = {"UNSPECIFIED": 0, "INTERNAL": 1, "SERVER": 2, "CLIENT": 3, "PRODUCER": 4, "CONSUMER": 5,
             "UNSET": 0, "OK": 1, "ERROR": 2}
    return names.get(str(v).rsplit("_", 1)[-1], 0)


def _pb_any(v: Any) -> Any:
    which = v.WhichOneof("value")
    if which is None:
        return None
    val = getattr(v, which)
    if which == "array_value":
        return [_pb_any(x) for x in val.values]
    if which == "kvlist_value":
        return {kv.key: _pb_any(kv.value) for kv in val.values}
    return val


def decode_protobuf(body: bytes) -> list[ReceivedSpan]:
    req = ExportTraceServiceRequest()
    req.ParseFromString(body)
    out = []
    for rs in req.resource_spans:
        resource = {kv.key: _pb_any(kv.value) for kv in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(ReceivedSpan(
                    trace_id=s.trace_id.hex(), span_id=s.span_id.hex(), parent_span_id=s.parent_span_id.hex(),
                    name=s.name, service_name=str(resource.get("service.name", "")),
                    attributes={kv.key: _pb_any(kv.value) for kv in s.attributes},
                    start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano, kind=s.kind,
                    status_code=s.status.code, events=tuple(e.name for e in s.events), scope=ss.scope.name,
                ))
    return out


# --- the server --------------------------------------------------------------------------------

class OtlpReceiver:
    """Collects the spans POSTed to http://127.0.0.1:<port>/v1/traces."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._spans: list[ReceivedSpan] = []
        self._cond = threading.Condition()
        self.requests: list[tuple[str, str]] = []  # (content type, content encoding) of each export
        self.errors: list[str] = []  # bodies that could not be decoded
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self.traces_url = self.url + "/v1/traces"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="otlp-receiver",
                                        daemon=True)
        self._thread.start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
                encoding = (self.headers.get("Content-Encoding") or "").strip().lower()
                if self.path.split("?")[0].rstrip("/") != "/v1/traces":
                    return self._reply(404, "text/plain", b"only /v1/traces")
                try:
                    if encoding == "gzip":
                        body = gzip.decompress(body)
                    elif encoding == "deflate":
                        body = zlib.decompress(body)
                    if ctype == "application/json":
                        spans, reply = decode_json(body), (200, "application/json", b"{}")
                    elif ctype in ("application/x-protobuf", "application/protobuf"):
                        ok = ExportTraceServiceResponse().SerializeToString()
                        spans, reply = decode_protobuf(body), (200, "application/x-protobuf", ok)
                    else:
                        return self._reply(415, "text/plain", b"unsupported content type")
                except Exception as e:  # a test wants to see this, not a hung wait_for
                    receiver.errors.append(f"{ctype}: {e!r}")
                    return self._reply(400, "text/plain", repr(e).encode())
                receiver._add(ctype, encoding, spans)
                self._reply(*reply)

            def _reply(self, code: int, ctype: str, payload: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:  # quiet
                pass

        return Handler

    def _add(self, ctype: str, encoding: str, spans: list[ReceivedSpan]) -> None:
        with self._cond:
            self.requests.append((ctype, encoding))
            self._spans.extend(spans)
            self._cond.notify_all()

    def spans(self) -> list[ReceivedSpan]:
        with self._cond:
            return list(self._spans)

    def clear(self) -> None:
        with self._cond:
            self._spans.clear()
            self.requests.clear()

    def wait_for(self, predicate: Callable[[ReceivedSpan], bool] = lambda s: True, timeout: float = 10.0,
                 count: int = 1) -> list[ReceivedSpan]:
        """The received spans matching `predicate`, once there are `count`; TimeoutError after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [s for s in self._spans if predicate(s)]
                left = deadline - time.monotonic()
                if len(found) >= count:
                    return found
                if left <= 0:
                    names = sorted({s.name for s in self._spans})
                    raise TimeoutError(f"{len(found)}/{count} matching spans after {timeout}s; received {names}"
                                       + (f"; decode errors {self.errors}" if self.errors else ""))
                self._cond.wait(left)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> "OtlpReceiver":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
