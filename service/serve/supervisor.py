"""`dgemma serve`: Triton as a supervised child process, the front and the metrics endpoint, one lifecycle.

Start: Triton (bound to 127.0.0.1, ports of its own), then the front (health NOT_SERVING until Triton and
the model are ready). While running: a dead Triton, or a dead engine inside it (its heartbeat, a gauge
the model sets every second while its scheduler runs, unchanged for `engine_heartbeat_timeout_s` by our
own monotonic clock: the backend stub died, its scheduler thread did, or a step has run past
NIM_ENGINE_STEP_TIMEOUT), turns health NOT_SERVING at once; Triton is then (killed and) restarted with
backoff, which ends the calls in flight with UNAVAILABLE; no process of the old Triton (an orphaned stub)
outlives it. SIGTERM/SIGINT: NOT_SERVING, in-flight calls finish within the grace period, Triton stops,
exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from service.errors import Unavailable
from service.front.server import FrontServer, FrontSettings
from service.telemetry.metrics import FrontMetrics, start_metrics_server, stop_metrics_server
from service.telemetry.tracing import shutdown_tracing, triton_trace_url
from service.triton.launcher import LOG_MAX_BYTES, TritonPorts, TritonServer
from service.triton.processes import become_subreaper
from service.triton.repository import RepositorySettings, build_repository

log = logging.getLogger("dgemma.serve")


@dataclass
class ServeOptions:
    front: FrontSettings
    repository: RepositorySettings
    cache_dir: Path
    triton_ports: TritonPorts
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 8002
    startup_timeout_s: float = 300.0
    shutdown_grace_s: float = 30.0
    # after SIGTERM, health reads NOT_SERVING (and calls are still served) this long before new calls are
    # refused: load balancers and Kubernetes probes see it and stop routing here
    drain_delay_s: float = 2.0
    restart_backoff_s: float = 2.0  # the wait after a failed restart, doubled after each, up to restart_backoff_max_s
    restart_backoff_max_s: float = 30.0
    engine_heartbeat_timeout_s: float = 5.0  # an older heartbeat: the engine is dead, Triton is restarted
    triton_log: Path | None = None  # Triton's output always goes to the `dgemma.triton` logger; also here
    triton_log_max_bytes: int = LOG_MAX_BYTES  # the file is rotated past this (one older file kept)


class Supervisor:
    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        repo = build_repository(opts.cache_dir / "model_repository", opts.repository)
        self.triton = TritonServer(repo, ports=opts.triton_ports, cache_dir=opts.cache_dir,
                                   trace_url=triton_trace_url(), log_file=opts.triton_log,
                                   log_max_bytes=opts.triton_log_max_bytes, cpu_only=opts.repository.device == "cpu")
        self.metrics = FrontMetrics()
        self.restarting = False
        self.restarts = 0
        self.engine_ok = True  # the engine's heartbeat is fresh (checked every poll while Triton runs)
        # Staleness is measured on this process's monotonic clock, from when the heartbeat's value last
        # changed: never by comparing the model's wall-clock value with ours (a clock step killed a healthy engine)
        self._last_beat = time.monotonic()  # when the heartbeat last changed (or Triton (re)started)
        self._beat_value: float | None = None
        self.stop_requested = asyncio.Event()
        self.front: FrontServer | None = None
        self.metrics_port = 0

    def backend_alive(self) -> bool:
        return not self.restarting and self.engine_ok and self.triton.alive()

    def backend_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.triton.ports.metrics}/metrics"

    async def _check_engine(self) -> bool:
        """Whether the engine inside Triton is alive: its heartbeat changed within the timeout (by this
        process's monotonic clock). Triton's metrics not answering counts the same way."""
        beat = await asyncio.to_thread(self.triton.engine_heartbeat)
        now = time.monotonic()
        if beat is not None and beat != self._beat_value:
            self._beat_value, self._last_beat = beat, now
        self.engine_ok = now - self._last_beat < self.opts.engine_heartbeat_timeout_s
        return self.engine_ok

    def _reset_heartbeat(self) -> None:
        """A (re)started Triton: its engine has the full timeout to show its first beat."""
        self._last_beat, self._beat_value = time.monotonic(), None

    async def _follow_ports(self) -> None:
        """Point the front at Triton's gRPC port again when a start had to move it (a port clash)."""
        target = f"127.0.0.1:{self.triton.ports.grpc}"
        if self.front is not None and self.front.triton.target != target:
            await self.front.triton.retarget(target)

    async def run(self) -> int:
        o = self.opts
        loop = asyncio.get_running_loop()
        # a dead Triton's orphaned stubs become our children, not init's: stop() kills and reaps them
        become_subreaper()
        for sig in (signal.SIGTERM, signal.SIGINT):  # before anything starts: a stop during start-up is clean
            loop.add_signal_handler(sig, self.stop_requested.set)
        try:
            # the front first: its ports answer while the model loads (health NOT_SERVING, HTTP ready 503)
            self.front = FrontServer(o.front, self.metrics, backend_alive=self.backend_alive,
                                     backend_metrics_url=self.backend_metrics_url)
            port = await self.front.start()
            try:
                await asyncio.to_thread(self.triton.start, o.startup_timeout_s, o.repository.model_name,
                                        self.stop_requested.is_set)
            except Unavailable:
                if not self.stop_requested.is_set():
                    raise
            if self.stop_requested.is_set():  # SIGTERM during start-up: a clean stop, not an error
                log.info("stopped during start-up")
                return 0
            await self._follow_ports()
            self._reset_heartbeat()
            await self.front.wait_serving(o.startup_timeout_s)  # the front's channel reconnects to it
            self.metrics_port = start_metrics_server(self.metrics, o.metrics_host, o.metrics_port,
                                                     backend_url=self.backend_metrics_url)
            print(f"dgemma: serving {o.front.model_id} on gRPC {o.front.host}:{port}, HTTP :{self.front.http_port} "
                  f"(metrics :{self.metrics_port}/metrics, Triton 127.0.0.1:{o.triton_ports.grpc})", flush=True)
            while not self.stop_requested.is_set():
                try:
                    await asyncio.wait_for(self.stop_requested.wait(), timeout=0.5)
                except asyncio.TimeoutError:
                    pass
                if self.stop_requested.is_set():
                    break
                if not self.triton.alive():
                    await self._restart_triton()
                elif not await self._check_engine():
                    await self._restart_triton(engine_dead=True)
            log.info("shutting down: NOT_SERVING for %.1fs, then draining for up to %.0fs", o.drain_delay_s,
                     o.shutdown_grace_s)
            await self.front.stop(o.shutdown_grace_s, o.drain_delay_s)
            return 0
        finally:  # whatever happened, Triton does not outlive us
            if self.front is not None and not self.front.stopping:
                await self.front.stop(0, 0)
            rc = await asyncio.to_thread(self.triton.stop)
            if self.metrics_port:
                stop_metrics_server(self.metrics_port)
            shutdown_tracing()
            log.info("stopped (tritonserver exit code %s)", rc)

    async def _restart_triton(self, engine_dead: bool = False) -> None:
        self.restarting = True  # health goes NOT_SERVING on the next readiness poll
        if engine_dead:  # Triton runs, the model in it does not: kill it (and its stubs), which ends the calls
            log.error("the engine's heartbeat stopped (backend stub or scheduler dead, or a step hung); "
                      "restarting tritonserver")
            await asyncio.to_thread(self.triton.stop, 0)
        else:
            code = self.triton.proc.returncode if self.triton.proc else None
            log.error("tritonserver exited with code %s; restarting", code)
            await asyncio.to_thread(self.triton.stop, 0)  # its stubs, orphaned now, die with it
        backoff = 0.0  # the first attempt at once: the model is what takes time to come back
        while not self.stop_requested.is_set():
            await asyncio.sleep(backoff)
            try:
                await asyncio.to_thread(self.triton.start, self.opts.startup_timeout_s,
                                        self.opts.repository.model_name, self.stop_requested.is_set)
                await self._follow_ports()
                self.restarts += 1
                self.metrics.backend_restarts.inc()
                log.info("tritonserver restarted (%d restarts)", self.restarts)
                break
            except Exception:
                backoff = min(2 * backoff or self.opts.restart_backoff_s, self.opts.restart_backoff_max_s)
                log.exception("tritonserver restart failed; retrying in %.0fs", backoff)
        self._reset_heartbeat()
        self.engine_ok = True
        self.restarting = False


def serve(opts: ServeOptions) -> int:
    return asyncio.run(Supervisor(opts).run())
