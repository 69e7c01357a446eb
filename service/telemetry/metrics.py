"""Prometheus metrics of the front, in a registry of their own, served on their own port.

Triton's backend exports `dgemma_*` metrics on Triton's metrics port; the front's names all start
with `dgemma_front_` so that a dashboard never mixes the two.

Use from a handler:

    with metrics.request("Generate") as r:   # in flight + queued from here
        ...                                    # r.first_event() when the backend's first event arrives
        r.canvas(steps=24, tokens=256)         # each committed canvas (the first also sets TTFC)
        r.code = "OK"                          # or any grpc.StatusCode; an exception gives UNKNOWN
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "dgemma_front_"
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TTFC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STEP_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)


def _code_name(code: Any) -> str:
    """'OK', 'INVALID_ARGUMENT'...: from a grpc.StatusCode or a string."""
    return str(getattr(code, "name", code)).upper()


class FrontMetrics:
    """The front's metrics. Each instance has its own CollectorRegistry (tests make many)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r, p = self.registry, PREFIX
        self.requests = Counter(p + "requests", "RPCs finished, by method and gRPC status code",
                                ["method", "code"], registry=r)
        self.request_duration = Histogram(p + "request_duration_seconds", "RPC duration, accept to last message",
                                          ["method"], buckets=DURATION_BUCKETS, registry=r)
        self.time_to_first_canvas = Histogram(p + "time_to_first_canvas_seconds",
                                              "Time from accepting an RPC to its first committed canvas",
                                              ["method"], buckets=TTFC_BUCKETS, registry=r)
        self.generated_tokens = Counter(p + "generated_tokens", "Tokens generated (committed canvases)",
                                        ["method"], registry=r)
        self.steps_per_canvas = Histogram(p + "steps_per_canvas", "Denoising steps a canvas took to commit",
                                          buckets=STEP_BUCKETS, registry=r)
        self.queue_depth = Gauge(p + "queue_depth",
                                 "Requests accepted by the front and waiting for their first event from the backend",
                                 registry=r)
        self.inflight = Gauge(p + "inflight_requests", "Requests being served by the front", registry=r)
        self.drafts_coalesced = Counter(p + "drafts_coalesced", "Drafts replaced by a newer one before a slow "
                                        "reader read them", registry=r)
        self.backend_restarts = Counter(p + "backend_restarts", "Times the supervisor restarted a dead tritonserver",
                                        registry=r)

    def request(self, method: str) -> "RequestMetrics":
        """Start tracking one RPC (in flight and queued from now)."""
        return RequestMetrics(self, method)

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


class RequestMetrics:
    """One RPC's share of the metrics; every method is idempotent where it makes sense."""

    def __init__(self, metrics: FrontMetrics, method: str) -> None:
        self.m, self.method = metrics, method
        self.code: Any = None  # set by the handler; finish() and __exit__ use it
        self.start = time.monotonic()
        self._queued = self._running = True
        self._first_canvas = False
        metrics.inflight.inc()
        metrics.queue_depth.inc()

    def first_event(self) -> None:
        """The backend's first event for this request arrived: it leaves the queue."""
        if self._queued:
            self._queued = False
            self.m.queue_depth.dec()

    def coalesced(self, drafts: int) -> None:
        """`drafts` drafts were replaced by newer ones before this call's reader took them."""
        if drafts:
            self.m.drafts_coalesced.inc(drafts)

    def canvas(self, steps: int | None = None, tokens: int = 0) -> None:
        """A canvas was committed after `steps` denoising steps, adding `tokens` tokens."""
        self.first_event()
        if not self._first_canvas:
            self._first_canvas = True
            self.m.time_to_first_canvas.labels(self.method).observe(time.monotonic() - self.start)
        if steps is not None:
            self.m.steps_per_canvas.observe(steps)
        if tokens:
            self.m.generated_tokens.labels(self.method).inc(tokens)

    def finish(self, code: Any = None) -> None:
        """The RPC ended with `code` (a grpc.StatusCode or its name; default self.code, else OK)."""
        if not self._running:
            return
        self._running = False
        self.first_event()
        self.m.inflight.dec()
        name = _code_name(code if code is not None else (self.code if self.code is not None else "OK"))
        self.m.requests.labels(self.method, name).inc()
        self.m.request_duration.labels(self.method).observe(time.monotonic() - self.start)

    def __enter__(self) -> "RequestMetrics":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is not None and self.code is None:
            import asyncio

            self.code = "CANCELLED" if issubclass(exc_type, asyncio.CancelledError) else "UNKNOWN"
        self.finish()


# --- the /metrics endpoint ---------------------------------------------------------------------

_servers: dict[int, Any] = {}
_servers_lock = threading.Lock()


def fetch_text(url: str, timeout_s: float = 2.0) -> bytes:
    """Another exposition (Triton's metrics on 127.0.0.1), or a comment saying it could not be read."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.read()
    except (OSError, ValueError) as e:  # URLError, timeouts, refused: Triton restarting or not up yet
        return f"# backend metrics unavailable: {type(e).__name__}\n".encode()


class _MetricsHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404)
            return
        body = self.server.render()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:  # scrapes are not worth a log line each
        pass


def render(metrics: FrontMetrics, backend_url: str | Callable[[], str] | None = None) -> bytes:
    """The front's exposition, then (with `backend_url`, or what it returns) Triton's: what every metrics
    endpoint serves."""
    url = backend_url() if callable(backend_url) else backend_url
    return metrics.exposition() + (fetch_text(url) if url else b"")


def start_metrics_server(metrics: FrontMetrics, host: str = "0.0.0.0", port: int = 0,
                         backend_url: str | Callable[[], str] | None = None) -> int:
    """Serve `metrics` at http://host:port/metrics from a daemon thread; returns the bound port.

    With `backend_url`, each scrape also carries that exposition (Triton's metrics, which listen on
    127.0.0.1 only), so one endpoint serves the pod: the names never collide (`dgemma_front_*` here).
    """
    httpd = ThreadingHTTPServer((host, port), _MetricsHandler)
    httpd.daemon_threads = True
    httpd.render = lambda: render(metrics, backend_url)
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
    bound = httpd.server_address[1]
    with _servers_lock:
        _servers[bound] = httpd
    return bound


def stop_metrics_server(port: int) -> None:
    """Stop the server start_metrics_server returned `port` for (no-op when unknown)."""
    with _servers_lock:
        httpd = _servers.pop(port, None)
    if httpd is not None:
        httpd.shutdown()
        httpd.server_close()
