"""`dgemma serve` as users run it (a real front and a real Triton on 127.0.0.1), serving the embedded model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service import DEFAULT_CHECKPOINT
from service.api.diffusiongemma.v1 import diffusiongemma_pb2_grpc as pb_grpc
from service.triton.launcher import free_port
from tests.e2e.otlp_receiver import OtlpReceiver

API_KEY = "e2e-key-0123456789"
MAX_CONCURRENT = 3


class Serve:
    """One `dgemma serve` process; `stub()` gives an authenticated API stub."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None, api_key: str | None = API_KEY,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.port, self.metrics_port, self.triton_metrics_port = free_port(), free_port(), free_port()
        self.http_port = free_port()
        self.api_key = api_key
        self.log = tmp / "serve.log"
        full_env = {**os.environ, "NIM_CACHE_PATH": str(tmp / "cache"), "OMP_NUM_THREADS": "1",
                    "NIM_TRITON_METRICS_PORT": str(self.triton_metrics_port), "NIM_LOG_LEVEL": "INFO",
                    "NIM_TRITON_LOG_FILE": str(tmp / "triton.log"), "NIM_HTTP_PORT": str(self.http_port),
                    **(env or {})}
        if api_key:
            full_env["NIM_API_KEYS"] = api_key
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--metrics-port", str(self.metrics_port), "--threads", "1"],
            env=full_env, stdout=subprocess.PIPE, stderr=open(self.log, "wb"), text=True)
        self.http_url = f"{'https' if credentials else 'http'}://127.0.0.1:{self.http_port}"
        # (live, ready) HTTP statuses seen while the model loads: the front's ports open before Triton starts
        self.loading_health: list[tuple[int, int]] = []
        loaded = threading.Event()
        watcher = threading.Thread(target=self._watch_loading, args=(loaded,), daemon=True)
        watcher.start()
        line = self.proc.stdout.readline()  # printed once Triton is ready and the front listens
        loaded.set()
        watcher.join(10)
        assert "dgemma: serving" in line, f"{line!r}\n{self.log.read_text()[-3000:]}"
        self.target = f"127.0.0.1:{self.port}"
        self.channel = (grpc.secure_channel(self.target, credentials) if credentials
                        else grpc.insecure_channel(self.target))
        self.wait_health("SERVING")

    def _watch_loading(self, loaded: threading.Event) -> None:
        if self.http_url.startswith("https"):
            return
        while not loaded.is_set() and self.proc.poll() is None:
            statuses = tuple(self.http_status(f"/v1/health/{p}") for p in ("live", "ready"))
            if statuses[0]:
                self.loading_health.append(statuses)
            time.sleep(0.05)

    def http_status(self, path: str) -> int:
        """The HTTP status of GET `path` (0 when nothing answers)."""
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0

    def metadata(self, key: str | None = None) -> tuple:
        key = key or self.api_key
        return (("authorization", f"Bearer {key}"),) if key else ()

    def stub(self) -> pb_grpc.DiffusionGemmaStub:
        return pb_grpc.DiffusionGemmaStub(self.channel)

    def health(self, service: str = "") -> str:
        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        except grpc.RpcError as e:
            return e.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(status)

    def wait_health(self, want: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.health() == want:
                return
            time.sleep(0.1)
        raise AssertionError(f"health never became {want} (now {self.health()})")

    def metrics(self, port: int | None = None) -> str:
        url = f"http://127.0.0.1:{port or self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str, port: int | None = None, **labels: str) -> float | None:
        """The sum of a metric's samples whose labels include `labels` (None when absent)."""
        found = None
        for line in self.metrics(port).splitlines():
            if not line.startswith(name) or line.startswith("#"):
                continue
            head, value = line.rsplit(" ", 1)
            if head.split("{")[0] != name or not all(f'{k}="{v}"' in head for k, v in labels.items()):
                continue
            found = (found or 0.0) + float(value)
        return found

    def live_canvases(self) -> float | None:
        return self.metric("dgemma_live_canvases", port=self.triton_metrics_port)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def child_pid(parent: int, needle: bytes) -> int | None:
    """A child process of `parent` whose command line holds `needle` (None: none)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and needle in cmd:
            return int(entry.name)
    return None


def triton_pid(serve_pid: int) -> int | None:
    return child_pid(serve_pid, b"tritonserver")


def stub_pid(serve_pid: int) -> int | None:
    """The Python backend's stub process (the model's interpreter) under `dgemma serve`'s Triton."""
    triton = triton_pid(serve_pid)
    return None if triton is None else child_pid(triton, b"triton_python_backend_stub")


def _started(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot), None when it is gone or a zombie: with the pid, it names
    one process even if the pid is reused."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def triton_processes(serve_pid: int) -> dict[int, int]:
    """pid -> start time of `dgemma serve`'s tritonserver and its backend stub."""
    pids = [triton_pid(serve_pid), stub_pid(serve_pid)]
    return {pid: t for pid in pids if pid is not None and (t := _started(pid)) is not None}


def still_running(procs: dict[int, int], timeout: float = 20.0) -> list[int]:
    """Those of `procs` (from triton_processes) still running after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = [pid for pid, t in procs.items() if _started(pid) == t]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


@pytest.fixture(scope="session")
def otlp():
    with OtlpReceiver() as rx:
        yield rx


@pytest.fixture(scope="session")
def server(tmp_path_factory, otlp):
    """The shared server: auth on, tracing to the test receiver, a low concurrency limit."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
           "OTEL_BSP_SCHEDULE_DELAY": "200", "NIM_MAX_CONCURRENT_REQUESTS": str(MAX_CONCURRENT)}
    srv = Serve(tmp_path_factory.mktemp("serve"), env)
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return DEFAULT_CHECKPOINT
