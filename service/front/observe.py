"""One public call's span, metrics and log lines, the same for the gRPC and the HTTP front."""

from __future__ import annotations

import logging

from opentelemetry import trace
from opentelemetry.context import Context

from service.request.errors import INTERNAL, Status, public_message, public_status
from service.telemetry.metrics import FrontMetrics

log = logging.getLogger("dgemma.front")


class Call:
    """A server span joined to the caller's trace (`parent`), the call's metrics under `method`, and the
    error table applied to failures. The span is never attached to the context (a stream may be closed
    from another task): the front passes `trace_context` on to Triton."""

    def __init__(self, metrics: FrontMetrics, tracer: trace.Tracer, method: str, span_name: str,
                 parent: Context | None, request_id: str, attributes: dict) -> None:
        self.method = method
        self.rid = request_id
        self.rm = metrics.request(method)
        self.span = tracer.start_span(span_name, context=parent, kind=trace.SpanKind.SERVER,
                                      attributes={**attributes, "dgemma.request_id": request_id})
        self.trace_context = trace.set_span_in_context(self.span, parent)
        self.finished = False

    def done(self, code: str, http_status: int | None = None) -> None:
        """The call ended with `code` (a gRPC status code's name: one vocabulary for both fronts); only the
        first outcome counts."""
        if self.finished:
            return
        self.finished = True
        if http_status is not None:
            self.span.set_attribute("http.response.status_code", http_status)
        if code != "OK":
            self.span.set_status(trace.Status(trace.StatusCode.ERROR, code))
        self.rm.finish(code)

    def extra(self) -> dict:
        """Log fields: the request id and, when traced, this call's trace and span ids."""
        extra = {"request_id": self.rid}
        sc = self.span.get_span_context()
        if sc.is_valid:
            extra.update(trace_id=format(sc.trace_id, "032x"), span_id=format(sc.span_id, "016x"))
        return extra

    def failed(self, e: BaseException) -> tuple[Status, str]:
        """Log the failure (a traceback only for internal errors), count it, and return what the client
        gets: the public status and message."""
        status, message = public_status(e), public_message(e, self.rid)
        if status == INTERNAL:
            log.error("request %s failed", self.rid, exc_info=e, extra=self.extra())
        else:
            log.info("request %s: %s: %s", self.rid, status.grpc.name, message, extra=self.extra())
        self.done(status.grpc.name, status.http)
        return status, message

    def end(self) -> None:
        self.span.end()
