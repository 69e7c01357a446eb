"""The HTTP front's server: uvicorn in the front's event loop, on a socket bound here (so a port in use is
an error naming NIM_HTTP_PORT), with the same TLS settings as gRPC. SIGTERM/SIGINT stay the supervisor's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.errors import InvalidArgument

log = logging.getLogger("dgemma.front")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield  # the supervisor handles SIGTERM/SIGINT and stops this server itself


class _H11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with its keep-alive timer also running on a new connection: one that sends
    nothing is closed after `timeout_keep_alive` (5 s), as an idle one between requests already is (uvicorn
    starts the timer only after a response)."""

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY on accepted sockets only when their proto says TCP; without
    # it, a response's second write waits for the client's delayed ACK (about 40 ms)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InvalidArgument("NIM_HTTP_PORT", f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class HttpServer:
    def __init__(self, app, host: str, port: int, tls=None, grace_s: float = 30.0) -> None:
        self.sock = _bind(host, port)
        self.port: int = self.sock.getsockname()[1]
        kw = {}
        if tls is not None:
            kw = dict(ssl_certfile=str(tls.cert), ssl_keyfile=str(tls.key))
            if tls.client_ca is not None:
                kw.update(ssl_ca_certs=str(tls.client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(app, http=_H11, lifespan="off", log_config=None, access_log=False, server_header=False,
                                timeout_graceful_shutdown=max(1, int(grace_s)), **kw)
        self.server = _Server(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        self._task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises what failed
                raise InvalidArgument("NIM_HTTP_PORT", "the HTTP server did not start")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self, grace_s: float | None = None) -> None:
        """Refuse new connections; let in-flight requests finish within the grace period."""
        if grace_s is not None:
            self.server.config.timeout_graceful_shutdown = max(1, int(grace_s))
        self.server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        self.sock.close()
