"""Server interceptors: bearer-token auth, and one place for errors, traces, metrics and request ids."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import uuid
from collections.abc import Callable, Sequence

import grpc
from opentelemetry.context import Context

from service.errors import InvalidArgument, Unauthenticated
from service.front.auth import BearerKeys
from service.front.call_limit import CallLimit
from service.request.errors import public_message, public_status
from service.front.observe import Call
from service.request.jobs import request_id_of
from service.telemetry.metrics import FrontMetrics, RequestMetrics
from service.telemetry.tracing import context_from_metadata, get_tracer

log = logging.getLogger("dgemma.front")
API_PREFIX = "/diffusiongemma.v1."
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)  # health stays open with auth on
_request_metrics: contextvars.ContextVar[RequestMetrics | None] = contextvars.ContextVar("dgemma_rm", default=None)
_trace_context: contextvars.ContextVar[Context | None] = contextvars.ContextVar("dgemma_trace", default=None)


def current_trace_context() -> Context | None:
    """The trace context of the RPC being served (its server span), for propagation to Triton."""
    return _trace_context.get()


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
        self._keys = BearerKeys(keys)

    def _ok(self, metadata: Sequence[tuple[str, str]]) -> bool:
        return self._keys.accepts(next((v for k, v in metadata if k == "authorization"), ""))

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


class RpcLimitInterceptor(grpc.aio.ServerInterceptor):
    """At most `limit` calls at once (NIM_MAX_CONCURRENT_RPCS), health checks exempt: a pod at its limit still
    answers its probes, so it is not restarted for being busy. Past it: RESOURCE_EXHAUSTED at once, by the
    error table. `limit`: a number, or the CallLimit shared with the HTTP front (one count for both)."""

    def __init__(self, limit: int | CallLimit) -> None:
        self.slots = limit if isinstance(limit, CallLimit) else CallLimit(limit)
        refusal = self.slots.refusal
        self._refusal = (public_status(refusal).grpc, public_message(refusal, ""))

    @property
    def limit(self) -> int:
        return self.slots.limit

    @property
    def active(self) -> int:
        return self.slots.active

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler

        kinds = [(handler.unary_unary, grpc.unary_unary_rpc_method_handler, self._unary),
                 (handler.unary_stream, grpc.unary_stream_rpc_method_handler, self._stream),
                 (handler.stream_unary, grpc.stream_unary_rpc_method_handler, self._unary),
                 (handler.stream_stream, grpc.stream_stream_rpc_method_handler, self._stream)]
        for behaviour, make, limited in kinds:  # every kind of method, reflection's stream included
            if behaviour is not None:
                return make(limited(behaviour), handler.request_deserializer, handler.response_serializer)
        return handler

    def _acquire(self, context) -> Callable[..., None] | None:
        """Take a slot for this call, or None at the limit. The slot comes back once, on whichever comes first:
        the handler's end (the returned release, called in a `finally`) or gRPC's done callback for the call."""
        release = self.slots.acquire()
        if release is not None:
            context.add_done_callback(release)
        return release

    def _unary(self, behaviour: Callable) -> Callable:
        async def call(request_or_iterator, context):
            release = self._acquire(context)
            if release is None:
                await context.abort(*self._refusal)
            try:
                return await behaviour(request_or_iterator, context)
            finally:
                release()

        return call

    def _stream(self, behaviour: Callable) -> Callable:
        async def call(request_or_iterator, context):
            release = self._acquire(context)
            if release is None:
                await context.abort(*self._refusal)
            try:
                async with contextlib.aclosing(behaviour(request_or_iterator, context)) as out:
                    async for response in out:
                        yield response
            finally:
                release()

        return call


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
        parent = context_from_metadata(details.invocation_metadata)

        async def unary(request, context):
            call = _Call(self, method, details.method.lstrip("/"), parent, request)
            async with call.guard(context):
                return await handler.unary_unary(request, context)

        async def stream(request, context):
            call = _Call(self, method, details.method.lstrip("/"), parent, request)
            # the servicer's stream is closed with ours when the client cancels (not left to the GC)
            async with call.guard(context), contextlib.aclosing(handler.unary_stream(request, context)) as responses:
                async for response in responses:
                    yield response

        return _wrap(handler, unary, stream)


class _Call(Call):
    """One RPC's span, metrics and request id (see Call); the servicer reads them from context variables."""

    def __init__(self, owner: ObservabilityInterceptor, method: str, span_name: str, parent, request) -> None:
        rid = getattr(request, "request_id", None)
        self.refused: InvalidArgument | None = None
        if rid is not None:  # validated before anything logs or traces it (a newline would forge log lines)
            try:
                rid = request_id_of(rid)
            except InvalidArgument as e:
                self.refused, rid = e, uuid.uuid4().hex  # refused in guard(); logged under a fresh id
            request.request_id = rid  # the servicer and the response carry the same id
        super().__init__(owner.metrics, owner.tracer, method, span_name, parent, rid or "",
                         {"rpc.system": "grpc", "rpc.service": "diffusiongemma.v1.DiffusionGemma",
                          "rpc.method": method})
        _request_metrics.set(self.rm)  # this handler's task: the servicer sees this RPC's metrics
        _trace_context.set(self.trace_context)

    @contextlib.asynccontextmanager
    async def guard(self, context):
        """Around the handler: OK, cancelled (client cancel or deadline: nothing to send) or failed."""
        try:
            if self.refused is not None:
                raise self.refused
            yield
        except (asyncio.CancelledError, GeneratorExit):
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            self.code(grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED)
            raise
        except grpc.aio.AbortError:  # already aborted (auth): count, log and pass on
            code = context.code() or grpc.StatusCode.UNKNOWN
            log.info("request %s: %s", self.rid, code.name, extra=self.extra())
            self.code(code)
            raise
        except BaseException as e:
            status, message = self.failed(e)
            self.span.set_attribute("rpc.grpc.status_code", status.grpc.value[0])
            await context.abort(status.grpc, message)
        else:
            self.code(grpc.StatusCode.OK)
        finally:
            self.end()

    def code(self, code: grpc.StatusCode) -> None:
        if code != grpc.StatusCode.OK:
            self.span.set_attribute("rpc.grpc.status_code", code.value[0])
        self.done(code.name)
