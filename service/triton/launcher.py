"""Start `tritonserver` as a child process bound to 127.0.0.1, wait for readiness, stop it cleanly.

Which binary: $TRITONSERVER, else /opt/tritonserver/bin/tritonserver (the NGC container), else the
Triton 2.51 server inside the `nvidia-pytriton` wheel, copied once to a writable directory with the
Python backend stub for this interpreter.

Nothing of a stopped Triton stays behind: it runs in a session of its own, and each start marks its
environment (inherited by its backend stubs) with a run id. A stop, or the next start, SIGKILLs whatever
still carries that id, the stubs an exited Triton left orphaned included (they ignore SIGTERM), and
reaps them (service/triton/processes.py). Triton's stdout and stderr go line by line to the `dgemma.triton`
logger (JSON lines when NIM_JSONL_LOGGING) and, when a log file is set, to that file, rotated at a size.
"""

from __future__ import annotations

import logging
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
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from service.errors import Unavailable
from service.triton.processes import kill_run

NGC_BINARY = Path("/opt/tritonserver/bin/tritonserver")
HEARTBEAT_METRIC = "dgemma_engine_heartbeat_seconds"  # set by the model (model.py)
RUN_ENV = "DGEMMA_TRITON_RUN"  # in the environment of one Triton start and of the stubs it launches
LOG_MAX_BYTES = 16 << 20  # Triton's log file is rotated past this (one older file kept)
triton_log = logging.getLogger("dgemma.triton")
log = logging.getLogger("dgemma.serve")


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
        log_max_bytes: int = LOG_MAX_BYTES,
        cpu_only: bool = False,
    ) -> None:
        """cpu_only: the model serves on the CPU, so Triton's complaints about a missing CUDA are harmless."""
        self.install = find_triton(cache_dir)
        self.cpu_only = cpu_only
        self.repo = Path(model_repository)
        self.ports = ports or TritonPorts.pick()
        self.trace_url = trace_url
        self.log_verbose = log_verbose
        self.log_file, self.log_max_bytes = log_file, log_max_bytes
        self.explicit_load = explicit_load  # models load only when asked (KServe load API)
        self.proc: subprocess.Popen | None = None
        self.run_id = ""  # in the environment of this start's tritonserver and its stubs (RUN_ENV)
        self._pump: _LogPump | None = None  # Triton's output while it runs

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
        self.stop(0)  # whatever a previous start left (a no-op after a stop)
        self.run_id = uuid.uuid4().hex
        env = {**os.environ, **self.install.env, "DGEMMA_PYTHONPATH": path, RUN_ENV: self.run_id}
        self.proc = subprocess.Popen(self.command(), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._pump = _LogPump(self.proc.stdout, self.log_file, self.log_max_bytes, self.cpu_only)
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
        """SIGINT, then SIGKILL to its process group after `timeout` seconds (0: at once); then, whether it
        exited by itself or not, SIGKILL to every process left of this run (backend stubs, orphaned ones
        too), waiting until they are gone. Also what cleans up after a Triton that died."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            if timeout > 0:
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)
        left = kill_run(f"{RUN_ENV}={self.run_id}", self.proc.pid, exclude={self.proc.pid})
        if left:
            log.warning("killed %d processes left by tritonserver (pid %d): %s", len(left), self.proc.pid, left)
        if self._pump is not None:
            self._pump.close()
            self._pump = None
        return self.proc.returncode


class _LogPump:
    """Triton's output, line by line, to the `dgemma.triton` logger (at Triton's own level: E, W, I) and
    to `path`, which is rotated to `path`.1 past `max_bytes`. Its thread reads until every writer (Triton,
    its stubs) is gone, and never stops before: a full pipe would block Triton."""

    LEVELS = {"E": logging.ERROR, "W": logging.WARNING}
    # Triton's error lines that only say there is no CUDA: expected when serving on a CPU, so warnings there
    CPU_NOISE = ("CudaDriverHelper has not been initialized",)

    def __init__(self, stream, path: Path | None, max_bytes: int, cpu_only: bool = False) -> None:
        self.stream, self.path, self.max_bytes, self.cpu_only = stream, path, max_bytes, cpu_only
        self.file = open(path, "ab") if path else None
        self.thread = threading.Thread(target=self._run, name="triton-log", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for line in iter(self.stream.readline, b""):
                try:
                    self._write(line)
                except Exception:  # a full disk, say: the next line tries again
                    pass
        finally:
            self.stream.close()
            if self.file is not None:
                self.file.close()

    def _write(self, line: bytes) -> None:
        text = line.decode(errors="replace").rstrip()
        if text:  # Triton's lines look like "I1130 12:00:00.000000 42 server.cc:1] ..."
            level = self.LEVELS.get(text[0], logging.INFO) if text[1:2].isdigit() else logging.INFO
            if level == logging.ERROR and self.cpu_only and any(n in text for n in self.CPU_NOISE):
                level = logging.WARNING
            triton_log.log(level, "%s", text)
        if self.file is not None:
            if self.file.tell() + len(line) > self.max_bytes and self.file.tell() > 0:
                self.file.close()
                os.replace(self.path, f"{self.path}.1")
                self.file = open(self.path, "ab")
            self.file.write(line)
            self.file.flush()

    def close(self, timeout: float = 5.0) -> None:
        """Wait for the end of Triton's output (its writers are gone by now)."""
        self.thread.join(timeout)


class _PortClash(Exception):
    def __init__(self, names: list[str], ports: TritonPorts) -> None:
        super().__init__(", ".join(f"{n} port {getattr(ports, n)} is taken" for n in names))
        self.names = names
