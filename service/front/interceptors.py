"""Server interceptors: bearer-token auth, and one place for errors, traces, metrics and request ids."""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import logging
import uuid
from collections.abc import Callable, Sequence

import grpc
from opentelemetry import propagate, trace

from service.errors import Unauthenticated
from service.front.errors import public_message, status_for
from service.telemetry.metrics import FrontMetrics, RequestMetrics
from service.telemetry.tracing import get_tracer

log = logging.getLogger("dgemma.front")
API_PREFIX = "/diffusiongemma.v1."
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)  # health stays open with auth on
_request_metrics: contextvars.ContextVar[RequestMetrics | None] = contextvars.ContextVar("dgemma_rm", default=None)


def current_request_metrics() -> RequestMetrics | None:
    """The metrics of the RPC being served (set by ObservabilityInterceptor)."""
    return _request_metrics.get()


def _wrap(handler: grpc.RpcMethodHandler, unary: Callable | None, stream: Callable | None) -> grpc.RpcMethodHandler:
    if handler.unary_unary is not None and unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream is not None and stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)
    return handler


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """`authorization: Bearer <key>` must match one of the keys, compared in constant time."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

    def _ok(self, metadata: Sequence[tuple[str, str]]) -> bool:
        given = next((v for k, v in metadata if k == "authorization"), "")
        scheme, _, token = given.partition(" ")
        token_b = token.strip().encode()
        matched = False
        for key in self._keys:  # no early exit: the time taken does not depend on which key matched
            matched |= hmac.compare_digest(token_b, key)
        return scheme.lower() == "bearer" and matched

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES) or self._ok(details.invocation_metadata or ()):
            return handler
        message = public_message(Unauthenticated("missing or invalid bearer token"), "")

        async def deny(request_or_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        async def deny_stream(request_or_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover (makes this an async generator)

        # every kind of method, reflection's bidirectional stream included
        kinds = [(handler.unary_unary, grpc.unary_unary_rpc_method_handler, deny),
                 (handler.unary_stream, grpc.unary_stream_rpc_method_handler, deny_stream),
                 (handler.stream_unary, grpc.stream_unary_rpc_method_handler, deny),
                 (handler.stream_stream, grpc.stream_stream_rpc_method_handler, deny_stream)]
        for behaviour, make, denial in kinds:
            if behaviour is not None:
                return make(denial, handler.request_deserializer, handler.response_serializer)
        return handler


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    """For every public RPC: a request id, a server span (joined to the caller's trace), the requests and
    latency metrics, and the error table applied: domain errors become their status code, anything else
    INTERNAL with a generic message (the traceback goes to the log only)."""

    def __init__(self, metrics: FrontMetrics) -> None:
        self.metrics = metrics
        self.tracer = get_tracer("dgemma.front")

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(API_PREFIX):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        carrier = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
        parent = propagate.extract(carrier)
        call = _Call(self, method, details.method.lstrip("/"), parent)

        async def unary(request, context):
            with call.span(request) as (span, rid):
                try:
                    response = await handler.unary_unary(request, context)
                except BaseException as e:
                    await call.fail(e, context, span, rid)
                    raise
                call.done(grpc.StatusCode.OK)
                return response

        async def stream(request, context):
            with call.span(request) as (span, rid):
                try:
                    async for response in handler.unary_stream(request, context):
                        yield response
                except BaseException as e:
                    await call.fail(e, context, span, rid)
                    raise
                call.done(grpc.StatusCode.OK)

        return _wrap(handler, unary, stream)


class _Call:
    def __init__(self, owner: ObservabilityInterceptor, method: str, span_name: str, parent) -> None:
        self.owner, self.method, self.span_name, self.parent = owner, method, span_name, parent
        self.rm: RequestMetrics | None = None

    def span(self, request):
        # in the handler's task, so the servicer sees this RPC's metrics
        self.rm = self.owner.metrics.request(self.method)
        _request_metrics.set(self.rm)
        rid = getattr(request, "request_id", None)
        if rid == "":
            rid = uuid.uuid4().hex
            request.request_id = rid  # the servicer and the response carry the same id
        outer = self

        class _Ctx:
            def __enter__(self):
                self.cm = outer.owner.tracer.start_as_current_span(
                    outer.span_name, context=outer.parent, kind=trace.SpanKind.SERVER,
                    attributes={"rpc.system": "grpc", "rpc.service": "diffusiongemma.v1.DiffusionGemma",
                                "rpc.method": outer.method, "dgemma.request_id": rid or ""},
                    record_exception=False, set_status_on_exception=False)
                return self.cm.__enter__(), rid or ""

            def __exit__(self, *exc):
                return self.cm.__exit__(*exc)

        return _Ctx()

    def done(self, code: grpc.StatusCode) -> None:
        self.rm.finish(code)

    async def fail(self, e: BaseException, context, span, rid: str) -> None:
        if isinstance(e, grpc.aio.AbortError):  # already aborted (auth): count, log and pass on
            code = context.code() or grpc.StatusCode.UNKNOWN
            log.info("request %s: %s", rid, code.name, extra={"request_id": rid})
            span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
            self.done(code)
            return
        if isinstance(e, asyncio.CancelledError):
            remaining = context.time_remaining()
            code = grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 \
                else grpc.StatusCode.CANCELLED
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
            self.done(code)
            return
        code = status_for(e)
        message = public_message(e, rid)
        if code == grpc.StatusCode.INTERNAL:
            log.error("request %s failed", rid, exc_info=e, extra={"request_id": rid})
        else:
            log.info("request %s: %s: %s", rid, code.name, message, extra={"request_id": rid})
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
        self.done(code)
        await context.abort(code, message)
