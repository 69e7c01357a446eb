"""The launcher's port handling and log file (issue 17, finding 7), with a fake `tritonserver`: a script
that binds its ports like the real one, and exits when one is taken."""

from __future__ import annotations

import os
import socket
import stat
import sys
from pathlib import Path

import pytest

from service.errors import Unavailable
from service.triton.launcher import TritonPorts, TritonServer, free_port, port_taken

FAKE = f"""#!{sys.executable}
import http.server, re, socket, sys, time
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
