"""The front: the grpc.aio server (the public API, health, optional reflection) and the OpenAI-compatible
HTTP server beside it, one request layer (Dispatcher) under both; auth, TLS, health and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service.api.diffusiongemma.v1 import diffusiongemma_pb2 as pb
from service.api.diffusiongemma.v1 import diffusiongemma_pb2_grpc as pb_grpc
from service.errors import InvalidArgument
from service.front.auth import BearerKeys
from service.front.call_limit import CallLimit
from service.front.reflection import enable_reflection
from service.request.catalog import ServedModel
from service.front.http_server import HttpServer
from service.front.interceptors import AuthInterceptor, ObservabilityInterceptor, RpcLimitInterceptor
from service.front.openai_api import DEFAULT_BODY_TIMEOUT_S, OpenAIApi
from service.request.dispatch import DEFAULT_TOKENIZER_THREADS, Dispatcher
from service.request.limits import DEFAULT_MAX_PROMPT_BYTES, DEFAULT_MAX_PROMPT_TOKENS, PromptLimits
from service.front.servicer import DiffusionGemmaServicer
from service.request.triton_client import TritonClient
from service.telemetry.metrics import FrontMetrics, render

log = logging.getLogger("dgemma.front")
# gRPC's own cap on calls sits this far above NIM_MAX_CONCURRENT_RPCS (ours, which health checks are exempt
# from): room for the probes, and a bound on health checks too.
HEALTH_HEADROOM = 64
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DiffusionGemma"].full_name


@dataclass
class TLSConfig:
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: mutual TLS, clients must present a certificate it signed

    def credentials(self) -> grpc.ServerCredentials:
        try:
            pair = (self.key.read_bytes(), self.cert.read_bytes())
            ca = self.client_ca.read_bytes() if self.client_ca else None
        except OSError as e:
            raise InvalidArgument("tls", f"cannot read a TLS file: {e.strerror}") from None
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


@dataclass
class FrontSettings:
    checkpoint: Path
    triton_target: str  # host:port of Triton's gRPC endpoint
    model_id: str = "diffusiongemma"
    triton_model: str = "diffusiongemma"
    profile: str = "torch-fp32-cpu"
    host: str = "0.0.0.0"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)
    tls: TLSConfig | None = None
    reflection: bool = False
    max_inflight: int = 64
    ready_poll_s: float = 1.0
    http_port: int | None = 8080  # the OpenAI-compatible HTTP API; None: not served
    http_max_body_bytes: int = 1 << 20
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES  # a request's text, checked before tokenizing
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS
    stream_buffer: int = 64  # events buffered per request for a slow reader (drafts coalesce beyond)
    max_concurrent_rpcs: int = 256  # gRPC and HTTP calls at once, health exempt; past it RESOURCE_EXHAUSTED / 429
    http_body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S  # an HTTP body must arrive within it; past it 408
    tokenizer_threads: int = DEFAULT_TOKENIZER_THREADS  # the pool that tokenizes before admission (both fronts)
    max_request_seconds: float = 600.0  # the engine's cap (0: none); caps HTTP X-Request-Timeout too
    grpc_max_message_bytes: int = 1 << 20  # largest gRPC request message; larger: RESOURCE_EXHAUSTED


class FrontServer:
    """Serves until `stop()`. Health is SERVING only while Triton and the model are ready and
    `backend_alive()` holds (the supervisor's view of the Triton process)."""

    def __init__(self, settings: FrontSettings, metrics: FrontMetrics,
                 backend_alive: Callable[[], bool] = lambda: True,
                 backend_metrics_url: str | Callable[[], str] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.backend_alive = backend_alive
        self.model = ServedModel.load(settings.checkpoint, settings.model_id, settings.profile)
        self.triton = TritonClient(settings.triton_target, settings.triton_model)
        tok = self.model.tokenizer
        limits = PromptLimits(settings.max_prompt_bytes, settings.max_prompt_tokens,
                              tok.longest_token_bytes() if tok else 1)
        self.dispatcher = Dispatcher(self.model, self.triton, settings.max_inflight, limits, settings.stream_buffer,
                                     settings.tokenizer_threads)
        self.call_limit = CallLimit(settings.max_concurrent_rpcs)  # one count for gRPC and HTTP
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.http_port: int | None = None
        self._http: HttpServer | None = None
        self._backend_metrics_url = backend_metrics_url
        self._server: grpc.aio.Server | None = None
        self._watch: asyncio.Task | None = None
        self._serving: bool | None = None
        self._stopping = False

    async def start(self) -> int:
        s = self.settings
        # outermost first: refused calls are counted, traced and logged too
        interceptors: list[grpc.aio.ServerInterceptor] = [ObservabilityInterceptor(self.metrics)]
        if s.api_keys:
            interceptors.append(AuthInterceptor(s.api_keys))
        self.rpc_limit = RpcLimitInterceptor(self.call_limit)
        interceptors.append(self.rpc_limit)
        server = grpc.aio.server(interceptors=interceptors,
                                 maximum_concurrent_rpcs=s.max_concurrent_rpcs + HEALTH_HEADROOM, options=[
            ("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", s.grpc_max_message_bytes)])
        self.servicer = DiffusionGemmaServicer(self.dispatcher)
        pb_grpc.add_DiffusionGemmaServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if s.reflection:
            enable_reflection(server, [SERVICE_NAME, health.SERVICE_NAME])
        address = f"{s.host}:{s.port}"
        self.port = server.add_secure_port(address, s.tls.credentials()) if s.tls else server.add_insecure_port(address)
        if not self.port:
            raise InvalidArgument("port", f"cannot listen on {address}")
        await self._set_serving(False)
        if s.http_port is not None:
            api = OpenAIApi(self.dispatcher, self.metrics, BearerKeys(s.api_keys), lambda: bool(self._serving),
                            lambda: render(self.metrics, self._backend_metrics_url), s.http_max_body_bytes,
                            self.call_limit, s.http_body_timeout_s, s.max_request_seconds)
            self._http = HttpServer(api.app, s.host, s.http_port, s.tls)
            self.http_port = await self._http.start()
        await server.start()
        self._server = server
        self._watch = asyncio.create_task(self._watch_ready())
        log.info("front listening on %s:%d, HTTP %s (%s), model %s", s.host, self.port, self.http_port,
                 "TLS" if s.tls else "plaintext", self.model.id)
        return self.port

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def _set_serving(self, serving: bool) -> None:
        if serving == self._serving or self._stopping:
            return
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
        self._serving = serving
        log.info("health: %s", "SERVING" if serving else "NOT_SERVING")

    async def wait_serving(self, timeout: float) -> bool:
        """Poll until Triton and the model answer ready (then SERVING at once), at most `timeout` seconds."""
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            if self.backend_alive() and await self.triton.ready():
                await self._set_serving(True)
                return True
            await asyncio.sleep(0.05)
        return False

    async def _watch_ready(self) -> None:
        while not self._stopping:
            ok = self.backend_alive() and await self.triton.ready()
            await self._set_serving(ok)
            await asyncio.sleep(self.settings.ready_poll_s)

    async def stop(self, grace: float = 30.0, drain_delay: float = 0.0) -> None:
        """NOT_SERVING first (still serving for `drain_delay` seconds, so routing moves away), then refuse
        new calls and let in-flight ones finish within `grace` seconds."""
        await self._set_serving(False)
        self._stopping = True
        await self.health.enter_graceful_shutdown()
        await asyncio.sleep(drain_delay)
        if self._watch:
            self._watch.cancel()
        stops = [self._server.stop(grace)] if self._server else []
        if self._http:
            stops.append(self._http.stop(grace))
        await asyncio.gather(*stops)
        await self.triton.close()
        self.dispatcher.close()

    async def wait(self) -> None:
        if self._server:
            await self._server.wait_for_termination()
