"""The launcher's port handling, log file and clean-up, with a fake `tritonserver`: a script that binds its
ports like the real one, exits when one is taken, and can start a stub that ignores SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path

import pytest

from service.errors import Unavailable
from service.triton.launcher import TritonPorts, TritonServer, _LogPump, free_port, port_taken

FAKE = f"""#!{sys.executable}
import http.server, os, re, socket, subprocess, sys, time
STUB = '''import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
if sys.argv[1] == "setsid":
    os.setsid()
time.sleep(300)  # bounded, should a test fail to end it
'''
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
socks = []
for name in ("grpc-port", "metrics-port"):
    s = socket.socket()
    s.bind(("127.0.0.1", int(args[name])))  # raises (exit code 1) when the port is taken
    s.listen()
    socks.append(s)

class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *a):
        pass

if os.environ.get("FAKE_STUB"):  # a backend stub as Triton's: deaf to SIGTERM and SIGINT, maybe its own session
    stub = subprocess.Popen([sys.executable, "-c", STUB, os.environ["FAKE_STUB"]])
    open(os.environ["FAKE_STUB_PID"], "w").write(str(stub.pid))
print("fake tritonserver up", flush=True)
http.server.HTTPServer(("127.0.0.1", int(args["http-port"])), Ready).serve_forever()
"""


@pytest.fixture
def fake_triton(tmp_path, monkeypatch):
    binary = tmp_path / "bin" / "tritonserver"
    binary.parent.mkdir()
    binary.write_text(FAKE)
    binary.chmod(binary.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("TRITONSERVER", str(binary))
    return binary


def test_free_port_never_hands_out_a_port_twice():
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)


def test_a_taken_port_moves_when_it_was_picked_and_is_named_when_it_was_set(tmp_path, fake_triton):
    squatter = socket.socket()  # another process took the port between the check and Triton's bind
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    try:
        assert port_taken(taken)
        ports = TritonPorts(taken, free_port(), free_port(), movable=("grpc", "http", "metrics"))
        server = TritonServer(tmp_path, ports=ports, log_file=tmp_path / "triton.log").start(timeout=30)
        try:
            assert server.ports.grpc != taken and server.ready()
        finally:
            server.stop()
        pinned = TritonPorts(taken, free_port(), free_port(), movable=("http", "metrics"))
        with pytest.raises(Unavailable, match=f"grpc port {taken} is taken"):
            TritonServer(tmp_path, ports=pinned).start(timeout=30)
    finally:
        squatter.close()


def test_the_log_file_is_closed_on_every_stop_and_restart(tmp_path, fake_triton):
    log = tmp_path / "triton.log"
    server = TritonServer(tmp_path, log_file=log)

    def open_fds() -> int:
        return sum(1 for fd in os.listdir("/proc/self/fd") if Path(f"/proc/self/fd/{fd}").resolve() == log)

    for _ in range(3):
        server.start(timeout=30)
        assert open_fds() == 1
        server.stop(timeout=0)  # killed, as the supervisor does to a dead engine
        assert open_fds() == 0
    assert log.read_text().count("fake tritonserver up") == 3


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


@pytest.mark.parametrize("how", ["killed", "exited"])
@pytest.mark.parametrize("session", ["shared", "setsid"])
def test_no_process_of_a_stopped_triton_is_left(tmp_path, fake_triton, monkeypatch, how, session):
    """Triton died (SIGKILL) or exited on SIGINT, leaving its stub (deaf to SIGTERM, in Triton's session or
    one of its own): stop() kills the stub too, and it is gone when stop() returns."""
    monkeypatch.setenv("FAKE_STUB", session)
    monkeypatch.setenv("FAKE_STUB_PID", str(tmp_path / "stub.pid"))
    server = TritonServer(tmp_path).start(timeout=30)
    stub = int((tmp_path / "stub.pid").read_text())
    try:
        assert _state(stub) not in ("", "Z")
        if how == "killed":
            os.kill(server.proc.pid, signal.SIGKILL)
            server.proc.wait(10)
        server.stop(timeout=10)
        assert _state(stub) in ("", "Z"), f"stub {stub} outlived tritonserver"
    finally:
        if _state(stub) not in ("", "Z"):
            os.kill(stub, signal.SIGKILL)


def test_a_new_start_kills_what_the_last_run_left(tmp_path, fake_triton, monkeypatch):
    monkeypatch.setenv("FAKE_STUB", "shared")
    monkeypatch.setenv("FAKE_STUB_PID", str(tmp_path / "stub.pid"))
    server = TritonServer(tmp_path).start(timeout=30)
    stub = int((tmp_path / "stub.pid").read_text())
    os.kill(server.proc.pid, signal.SIGKILL)  # dies; the supervisor starts it again without a stop()
    try:
        server.start(timeout=30)
        assert _state(stub) in ("", "Z")
    finally:
        server.stop(timeout=0)
        if _state(stub) not in ("", "Z"):
            os.kill(stub, signal.SIGKILL)


class _Lines:
    def __init__(self, lines: list[bytes]) -> None:
        self.lines = lines

    def readline(self) -> bytes:
        return self.lines.pop(0) if self.lines else b""

    def close(self) -> None:
        pass


def test_triton_output_goes_to_the_log_at_its_level_and_its_file_is_rotated(tmp_path, caplog):
    log, max_bytes = tmp_path / "triton.log", 1000
    line = b"I1130 12:00:00.000000 42 server.cc:1] a line of Triton's log that is long enough\n"
    lines = [b"E1130 12:00:00.000000 42 server.cc:2] failed\n", b"W1130 12:00:00.000000 42 x.cc:3] hm\n",
             b"+--------+ a table row\n"] + [line] * (5 * max_bytes // len(line))
    with caplog.at_level(logging.INFO, logger="dgemma.triton"):
        pump = _LogPump(_Lines(list(lines)), log, max_bytes)
        pump.close()
    assert not pump.thread.is_alive()
    levels = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "dgemma.triton"]
    assert levels[:3] == [(logging.ERROR, lines[0].decode().strip()), (logging.WARNING, lines[1].decode().strip()),
                          (logging.INFO, "+--------+ a table row")]
    assert len(levels) == len(lines)
    files = sorted(tmp_path.glob("triton.log*"))
    assert [f.name for f in files] == ["triton.log", "triton.log.1"]
    assert all(f.stat().st_size <= max_bytes for f in files)
    assert log.read_bytes().endswith(line)


@pytest.mark.parametrize("cpu_only, level", [(True, logging.WARNING), (False, logging.ERROR)])
def test_no_cuda_complaint_is_a_warning_only_when_serving_on_the_cpu(caplog, cpu_only, level):
    line = b'E1204 19:05:24.482219 18049 server.cc:241] "CudaDriverHelper has not been initialized."\n'
    with caplog.at_level(logging.INFO, logger="dgemma.triton"):
        _LogPump(_Lines([line]), None, 1000, cpu_only).close()
    assert [r.levelno for r in caplog.records if r.name == "dgemma.triton"] == [level]
