"""Start `tritonserver` as a child process bound to 127.0.0.1, wait for readiness, stop it cleanly.

Which binary: $TRITONSERVER, else /opt/tritonserver/bin/tritonserver (the NGC container), else the
Triton 2.51 server inside the `nvidia-pytriton` wheel, copied once to a writable directory with the
Python backend stub for this interpreter.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from service.errors import Unavailable

NGC_BINARY = Path("/opt/tritonserver/bin/tritonserver")
HEARTBEAT_METRIC = "dgemma_engine_heartbeat_seconds"  # set by the model (model.py)


@dataclass
class TritonInstall:
    binary: Path
    backend_dir: Path
    env: dict[str, str] = field(default_factory=dict)


def _pytriton_root() -> Path | None:
    try:
        import pytriton  # noqa: F401  (the wheel's Python API is not used, only its binaries)
    except ImportError:
        return None
    root = Path(sys.modules["pytriton"].__file__).parent / "tritonserver"
    return root if (root / "bin" / "tritonserver").is_file() else None


def _prepare_pytriton(cache_dir: Path) -> TritonInstall:
    root = _pytriton_root()
    if root is None:
        raise Unavailable(
            "no tritonserver found: set $TRITONSERVER, run in the NGC Triton container "
            "(/opt/tritonserver), or install the nvidia-pytriton wheel (pip install nvidia-pytriton==0.7.0)"
        )
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / ver / "triton_python_backend_stub"
    if not stub.is_file():
        raise Unavailable(f"nvidia-pytriton has no Python backend stub for Python {ver}")
    target = cache_dir / f"tritonserver-py{ver}"
    marker = target / ".ready"
    if not marker.is_file():
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(root, target, symlinks=True)
        shutil.copy2(stub, target / "backends" / "python" / "triton_python_backend_stub")
        marker.touch()
    libs = [sysconfig.get_config_var("LIBDIR") or "", str(root.parent.parent / "nvidia_pytriton.libs")]
    env = {"LD_LIBRARY_PATH": ":".join([*libs, os.environ.get("LD_LIBRARY_PATH", "")]).rstrip(":")}
    return TritonInstall(target / "bin" / "tritonserver", target / "backends", env)


def default_cache_dir() -> Path:
    """NIM_CACHE_PATH, else ~/.cache/dgemma: the Triton copy and the rendered model repository live there."""
    return Path(os.environ.get("NIM_CACHE_PATH") or Path.home() / ".cache" / "dgemma")


def find_triton(cache_dir: Path | None = None) -> TritonInstall:
    explicit = os.environ.get("TRITONSERVER")
    if explicit:
        binary = Path(explicit)
        if not binary.is_file():
            raise Unavailable(f"$TRITONSERVER points to {explicit}, which does not exist")
        return TritonInstall(binary, binary.parent.parent / "backends")
    if NGC_BINARY.is_file():
        return TritonInstall(NGC_BINARY, NGC_BINARY.parent.parent / "backends")
    cache = cache_dir or default_cache_dir()
    return _prepare_pytriton(cache)


_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def free_port() -> int:
    """A port free on 127.0.0.1 now, never one this process handed out before. Another process may still
    take it before it is used: TritonServer.start moves to fresh ports when Triton finds one taken."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with _handed_out_lock:
            if port not in _handed_out:
                _handed_out.add(port)
                return port


def port_taken(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT socket does not count
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@dataclass
class TritonPorts:
    grpc: int
    http: int
    metrics: int
    # the ports picked by free_port() rather than set by the operator: start() moves these on a clash
    movable: tuple[str, ...] = ()

    @staticmethod
    def pick() -> "TritonPorts":
        return TritonPorts(free_port(), free_port(), free_port(), movable=("grpc", "http", "metrics"))


class TritonServer:
    """One tritonserver child process serving a model repository on 127.0.0.1."""

    def __init__(
        self,
        model_repository: Path,
        ports: TritonPorts | None = None,
        trace_url: str | None = None,
        log_verbose: int = 0,
        cache_dir: Path | None = None,
        log_file: Path | None = None,
        explicit_load: bool = False,
    ) -> None:
        self.install = find_triton(cache_dir)
        self.repo = Path(model_repository)
        self.ports = ports or TritonPorts.pick()
        self.trace_url = trace_url
        self.log_verbose = log_verbose
        self.log_file = log_file
        self.explicit_load = explicit_load  # models load only when asked (KServe load API)
        self.proc: subprocess.Popen | None = None
        self._log = None  # Triton's log file while it runs; closed on stop and before each start

    def command(self) -> list[str]:
        p = self.ports
        cmd = [
            str(self.install.binary), f"--model-repository={self.repo}",
            f"--backend-directory={self.install.backend_dir}",
            "--grpc-address=127.0.0.1", f"--grpc-port={p.grpc}",
            "--http-address=127.0.0.1", f"--http-port={p.http}",
            "--metrics-address=127.0.0.1", f"--metrics-port={p.metrics}",
            "--allow-metrics=true", "--allow-gpu-metrics=false", "--allow-cpu-metrics=false",
            "--exit-timeout-secs=10", f"--log-verbose={self.log_verbose}",
            "--strict-readiness=true",
        ]
        if self.explicit_load:
            cmd.append("--model-control-mode=explicit")
        if self.trace_url:
            cmd += ["--trace-config", "mode=opentelemetry", "--trace-config", "rate=1",
                    "--trace-config", "level=TIMESTAMPS", "--trace-config", f"opentelemetry,url={self.trace_url}"]
        return cmd

    def start(self, timeout: float = 120.0, wait_model: str | None = None,
              cancelled: Callable[[], bool] | None = None, attempts: int = 3) -> "TritonServer":
        """Start and wait until ready (and `wait_model` loaded); `cancelled()` true stops waiting and the server.

        When Triton exits at start because another process took one of its ports, the movable ones
        (`TritonPorts.movable`) move to fresh ports and it starts again, `attempts` times in all."""
        for attempt in range(attempts):
            try:
                return self._start_once(timeout, wait_model, cancelled)
            except _PortClash as clash:
                moved = [name for name in clash.names if name in self.ports.movable]
                if moved != clash.names or attempt + 1 == attempts:
                    raise Unavailable(f"tritonserver could not listen: {clash}") from None
                for name in moved:
                    setattr(self.ports, name, free_port())
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float, wait_model: str | None,
                    cancelled: Callable[[], bool] | None) -> "TritonServer":
        # The Python backend's stub is another interpreter: give it this one's import path.
        path = os.pathsep.join(p for p in sys.path if p and Path(p).is_dir())
        env = {**os.environ, **self.install.env, "DGEMMA_PYTHONPATH": path}
        self._close_log()
        out = self._log = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.command(), env=env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                taken = [name for name in ("grpc", "http", "metrics") if port_taken(getattr(self.ports, name))]
                if taken:
                    raise _PortClash(taken, self.ports)
                raise Unavailable(f"tritonserver exited at start with code {self.proc.returncode}")
            if self.ready(wait_model):
                return self
            if cancelled is not None and cancelled():
                self.stop()
                raise Unavailable("tritonserver start cancelled")
            time.sleep(0.25)
        self.stop()
        raise Unavailable(f"tritonserver was not ready within {timeout:.0f}s")

    def _close_log(self) -> None:
        if self._log is not None and self._log is not subprocess.DEVNULL:
            self._log.close()
        self._log = None

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports.http}{path}", timeout=2) as r:
                return r.status
        except Exception:  # connection refused, 400 (not ready), timeouts
            return 0

    def ready(self, model: str | None = None) -> bool:
        path = f"/v2/models/{model}/ready" if model else "/v2/health/ready"
        return self._get(path) == 200

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def engine_heartbeat(self) -> float | None:
        """The model's last heartbeat (Unix time, the `dgemma_engine_heartbeat_seconds` gauge that the
        backend sets every second while its scheduler runs); None when Triton's metrics do not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports.metrics}/metrics", timeout=2) as r:
                text = r.read().decode()
        except Exception:  # connection refused, timeouts
            return None
        for line in text.splitlines():
            if line.startswith(HEARTBEAT_METRIC + "{") or line.startswith(HEARTBEAT_METRIC + " "):
                return float(line.rsplit(" ", 1)[1])
        return None

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGINT, then SIGKILL to its process group (the backend stubs too) after `timeout` seconds
        (0: at once)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            if timeout > 0:
                self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._close_log()
        return self.proc.returncode


class _PortClash(Exception):
    def __init__(self, names: list[str], ports: TritonPorts) -> None:
        super().__init__(", ".join(f"{n} port {getattr(ports, n)} is taken" for n in names))
        self.names = names
