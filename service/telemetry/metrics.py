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

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
        self.ignored_fields = Counter(p + "ignored_fields", "HTTP body fields ignored (unknown to this server, or "
                                      "known and without effect), by name (past 64 names: 'other')", ["field"],
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

METRICS_TIMEOUT_S = 5.0  # a connection's request head must arrive, and its response leave, within this
METRICS_MAX_CONNECTIONS = 256  # connections at once; further ones are closed at once
_MAX_HEAD_BYTES = 8192

_servers: dict[int, "_MetricsServer"] = {}
_servers_lock = threading.Lock()
log = logging.getLogger("dgemma.metrics")


def fetch_text(url: str, timeout_s: float = 2.0) -> bytes:
    """Another exposition (Triton's metrics on 127.0.0.1), or a comment saying it could not be read."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.read()
    except (OSError, ValueError) as e:  # URLError, timeouts, refused: Triton restarting or not up yet
        return f"# backend metrics unavailable: {type(e).__name__}\n".encode()


def render(metrics: FrontMetrics, backend_url: str | Callable[[], str] | None = None) -> bytes:
    """The front's exposition, then (with `backend_url`, or what it returns) Triton's: what every metrics
    endpoint serves."""
    url = backend_url() if callable(backend_url) else backend_url
    return metrics.exposition() + (fetch_text(url) if url else b"")


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8", head: bool = False) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + (b"" if head else body)


class _MetricsServer:
    """GET /metrics (or /) on an asyncio loop in one daemon thread, one request per connection: an idle
    connection costs no thread, and is closed when its request head has not arrived within `timeout_s`;
    beyond `max_connections` at once, new connections are closed at once. Scrapes render on one worker
    thread (the backend's exposition is fetched there)."""

    def __init__(self, render_fn: Callable[[], bytes], host: str, port: int, timeout_s: float,
                 max_connections: int) -> None:
        self.render, self.timeout_s, self.max_connections = render_fn, timeout_s, max_connections
        self.sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                         reuse_port=False)
        self.port: int = self.sock.getsockname()[1]
        self.writers: set[asyncio.StreamWriter] = set()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="metrics-render")
        self.loop = asyncio.new_event_loop()
        started = concurrent.futures.Future()
        self.thread = threading.Thread(target=self._run, args=(started,), name="metrics-http", daemon=True)
        self.thread.start()
        started.result()

    def _run(self, started: concurrent.futures.Future) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.server = self.loop.run_until_complete(
                asyncio.start_server(self._serve, sock=self.sock, limit=_MAX_HEAD_BYTES))
        except BaseException as e:  # noqa: BLE001 (raised in the caller)
            started.set_exception(e)
            return
        started.set_result(None)
        self.loop.run_forever()
        self.loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self.writers) >= self.max_connections:
            writer.transport.abort()
            return
        self.writers.add(writer)
        try:
            async with asyncio.timeout(self.timeout_s):
                head = await reader.readuntil(b"\r\n\r\n")
            writer.write(await self._answer(head))
            writer.close()  # once the response is sent
            async with asyncio.timeout(self.timeout_s):
                await writer.wait_closed()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # idle, slow, gone or oversized: closed
        finally:
            self.writers.discard(writer)
            writer.transport.abort()  # closed already, or given up on: what is left unsent is dropped

    async def _answer(self, head: bytes) -> bytes:
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3:
            return _response("400 Bad Request", b"bad request\n")
        method, target = parts[0], parts[1]
        if method not in (b"GET", b"HEAD"):
            return _response("405 Method Not Allowed", b"GET only\n")
        if target.split(b"?", 1)[0] not in (b"/metrics", b"/"):
            return _response("404 Not Found", b"not found; scrape /metrics\n")
        try:
            body = await self.loop.run_in_executor(self.pool, self.render)
        except Exception:  # noqa: BLE001 (the traceback goes to the log only)
            log.exception("rendering the metrics failed")
            return _response("500 Internal Server Error", b"internal error\n")
        return _response("200 OK", body, CONTENT_TYPE_LATEST, head=method == b"HEAD")

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            for w in list(self.writers):
                w.transport.abort()

        with contextlib.suppress(RuntimeError, concurrent.futures.TimeoutError):
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.pool.shutdown(wait=False, cancel_futures=True)


def start_metrics_server(metrics: FrontMetrics, host: str = "0.0.0.0", port: int = 0,
                         backend_url: str | Callable[[], str] | None = None, *,
                         timeout_s: float = METRICS_TIMEOUT_S, max_connections: int = METRICS_MAX_CONNECTIONS) -> int:
    """Serve `metrics` at http://host:port/metrics from a daemon thread; returns the bound port.

    With `backend_url`, each scrape also carries that exposition (Triton's metrics, which listen on
    127.0.0.1 only), so one endpoint serves the pod: the names never collide (`dgemma_front_*` here).
    `timeout_s` and `max_connections`: see _MetricsServer.
    """
    server = _MetricsServer(lambda: render(metrics, backend_url), host, port, timeout_s, max_connections)
    with _servers_lock:
        _servers[server.port] = server
    return server.port


def stop_metrics_server(port: int) -> None:
    """Stop the server start_metrics_server returned `port` for (no-op when unknown)."""
    with _servers_lock:
        server = _servers.pop(port, None)
    if server is not None:
        server.stop()
