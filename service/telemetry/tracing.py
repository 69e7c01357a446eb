"""OpenTelemetry tracing, configured by the standard OTEL_* environment variables.

- `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as is) or `OTEL_EXPORTER_OTLP_ENDPOINT` (a base URL:
  `/v1/traces` is appended for OTLP/HTTP). Unlike the SDK's default, no endpoint means no tracing:
  we never retry against localhost:4318 when nobody asked for traces.
- `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` / `OTEL_EXPORTER_OTLP_PROTOCOL`: `http/protobuf` (default)
  or `grpc`. `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` override the service name given in
  code. `OTEL_TRACES_EXPORTER=none` or `OTEL_SDK_DISABLED=true` turn tracing off; `console` prints
  spans. Headers, timeouts, compression, certificates, `OTEL_TRACES_SAMPLER` and `OTEL_BSP_*` are
  read by the SDK itself.

This module keeps its own TracerProvider (`get_tracer()` uses it) and installs it as the global one
the first time only, since OpenTelemetry allows setting the global provider once per process. That
lets tests set tracing up, shut it down and set it up again against another receiver.

Propagation is W3C trace context only (`traceparent`, `tracestate`): that is what Triton reads.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

TRACES_PATH = "/v1/traces"
BACKEND_TRACER = "diffusiongemma.backend"
_W3C = TraceContextTextMapPropagator()
_TRUE = {"1", "true", "yes", "on"}

_lock = threading.Lock()
_provider: Any = None  # opentelemetry.sdk.trace.TracerProvider while tracing is on


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def _exporters() -> list[str]:
    """The exporters asked for, [] when tracing is disabled."""
    if (_env("OTEL_SDK_DISABLED") or "").lower() in _TRUE:
        return []
    names = [n.strip().lower() for n in (_env("OTEL_TRACES_EXPORTER") or "otlp").split(",") if n.strip()]
    if "none" in names:
        return []
    unknown = [n for n in names if n not in ("otlp", "console")]
    if unknown:
        log.warning("OTEL_TRACES_EXPORTER: unsupported exporter(s) %s ignored (use otlp, console or none)", unknown)
    return [n for n in names if n in ("otlp", "console")]


def traces_protocol() -> str:
    """The OTLP protocol for traces: 'http/protobuf', 'http/json' or 'grpc' (lower case)."""
    value = _env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or _env("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    return value.lower()


def traces_endpoint(protocol: str | None = None) -> str | None:
    """Where OTLP traces go, from the environment; None when no endpoint is configured."""
    signal = _env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if signal:
        return signal
    base = _env("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not base:
        return None
    if (protocol or traces_protocol()) == "grpc":
        return base
    return base.rstrip("/") + TRACES_PATH


def _otlp_exporter() -> Any | None:
    protocol = traces_protocol()
    endpoint = traces_endpoint(protocol)
    if endpoint is None:
        log.info("tracing: no OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT set, OTLP export off")
        return None
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=endpoint)
    if protocol != "http/protobuf":
        # The Python SDK has no OTLP/HTTP JSON exporter; collectors take protobuf on the same path.
        log.warning("tracing: OTLP protocol %r is not supported here, using http/protobuf", protocol)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(endpoint=endpoint)


def _resource(service_name: str) -> Any:
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, OTELResourceDetector, Resource

    attrs: dict[str, str] = {SERVICE_NAME: service_name}
    try:
        from importlib.metadata import version

        attrs[SERVICE_VERSION] = version("diffusiongemma-nim")
    except Exception:  # not installed as a distribution (a source checkout)
        pass
    # Resource.create lets our attributes win over the environment's; merge the environment back on top.
    return Resource.create(attrs).merge(OTELResourceDetector().detect())


def setup_tracing(service_name: str) -> bool:
    """Configure tracing from the environment; returns whether tracing is on. Safe to call again."""
    global _provider
    with _lock:
        if _provider is not None:
            return True
        names = _exporters()
        if not names:
            return False
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        exporters = []
        if "otlp" in names:
            exporter = _otlp_exporter()
            if exporter is not None:
                exporters.append(exporter)
        if "console" in names:
            exporters.append(ConsoleSpanExporter())
        if not exporters:
            return False
        provider = TracerProvider(resource=_resource(service_name))  # sampler from OTEL_TRACES_SAMPLER
        for exporter in exporters:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            trace.set_tracer_provider(provider)  # once per process; later setups use get_tracer()
        _provider = provider
        log.info("tracing on: service %s, exporters %s, endpoint %s", provider.resource.attributes.get("service.name"),
                 names, traces_endpoint())
        return True


def triton_trace_url() -> str | None:
    """The value for Triton's `--trace-config opentelemetry,url=`, or None: Triton not to trace.

    Triton 2.51 exports OTLP/HTTP (JSON) only, to a full traces URL; both `HOST:PORT/v1/traces` and
    `http://HOST:PORT/v1/traces` were seen working, so the endpoint is passed through as configured.
    """
    if "otlp" not in _exporters():
        return None
    protocol = traces_protocol()
    endpoint = traces_endpoint(protocol)
    if endpoint is None:
        return None
    if protocol == "grpc":
        log.warning("tracing: Triton exports OTLP/HTTP only and OTEL_EXPORTER_OTLP_PROTOCOL is grpc: "
                    "Triton's own spans are off (set OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf to get them)")
        return None
    return endpoint


def tracing_enabled() -> bool:
    return _provider is not None


def get_tracer(name: str) -> trace.Tracer:
    """A tracer of this module's provider; the global (possibly no-op) one while tracing is off."""
    provider = _provider
    return provider.get_tracer(name) if provider is not None else trace.get_tracer(name)


def shutdown_tracing(timeout_s: float = 5.0) -> None:
    """Flush pending spans and stop exporting (at process exit). Waits at most timeout_s."""
    global _provider
    with _lock:
        provider, _provider = _provider, None
    if provider is None:
        return
    # TracerProvider.shutdown takes no timeout and an unreachable collector makes the exporter retry.
    worker = threading.Thread(target=provider.shutdown, name="otel-shutdown", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        log.warning("tracing: spans not flushed within %.1fs, giving up", timeout_s)


# --- propagation -------------------------------------------------------------------------------

def traceparent_metadata(ctx: Context | None = None) -> list[tuple[str, str]]:
    """W3C `traceparent` (and `tracestate`) for the current span, as gRPC metadata; [] when none."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, context=ctx)
    return list(carrier.items())


def context_from_traceparent(value: str | bytes | None, tracestate: str | None = None) -> Context | None:
    """A Context whose remote parent is `value`; None when value is empty or invalid. Never raises.

    `value` is a W3C traceparent (`00-<trace>-<span>-<flags>`) or the JSON object Triton's Python
    backend gives for a request (`request.trace().get_context()`: `{"traceparent": "00-..."}`).
    """
    if not value:
        return None
    try:
        text = value.decode() if isinstance(value, bytes) else str(value)
        text = text.strip()
        if text.startswith("{"):
            obj = json.loads(text)
            text = obj.get("traceparent") or ""
            tracestate = tracestate or obj.get("tracestate")
        carrier = {"traceparent": text}
        if tracestate:
            carrier["tracestate"] = tracestate
        ctx = _W3C.extract(carrier)
        if trace.get_current_span(ctx).get_span_context().is_valid:
            return ctx
    except Exception:  # a malformed header is not the request's fault
        log.debug("ignoring an invalid traceparent %r", value, exc_info=True)
    return None


def context_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context | None:
    """The parent Context carried by incoming gRPC metadata (a client's traceparent), or None."""
    parent = state = None
    for key, value in metadata or ():
        key = key.lower()
        if key == "traceparent":
            parent = value
        elif key == "tracestate":
            state = value.decode() if isinstance(value, bytes) else value
    return context_from_traceparent(parent, state)


# --- spans with explicit times (the Triton backend) ----------------------------------------------

class BackendSpan(NamedTuple):
    name: str
    start_ns: int  # time.time_ns() clock: OTLP times are Unix epoch nanoseconds
    end_ns: int
    attributes: Mapping[str, Any] | None = None


def emit_span(
    name: str,
    start_ns: int,
    end_ns: int,
    attributes: Mapping[str, Any] | None = None,
    parent: Context | str | None = None,
    *,
    error: str | None = None,
    tracer_name: str = BACKEND_TRACER,
) -> Context:
    """Record one finished span with explicit start/end times (Unix epoch ns).

    `parent` is a Context, a traceparent string (see `context_from_traceparent`) or None (the current
    context). Returns the Context of the new span, to parent further spans under it.
    """
    if isinstance(parent, (str, bytes)):
        parent = context_from_traceparent(parent)
    span = get_tracer(tracer_name).start_span(
        name, context=parent, kind=trace.SpanKind.INTERNAL, attributes=dict(attributes or {}), start_time=start_ns
    )
    if error:
        span.set_status(trace.Status(trace.StatusCode.ERROR, error))
    span.end(end_time=max(end_ns, start_ns))
    return trace.set_span_in_context(span, parent)


def record_backend_spans(parent_traceparent: str | None, spans: Iterable[BackendSpan]) -> int:
    """Emit `spans` as children of `parent_traceparent`; returns how many were recorded (0 when off)."""
    if _provider is None and isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return 0
    parent = context_from_traceparent(parent_traceparent)
    count = 0
    for s in spans:
        emit_span(s.name, s.start_ns, s.end_ns, s.attributes, parent)
        count += 1
    return count
