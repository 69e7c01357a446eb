"""The metrics port under idle and slow connections: no thread per connection, idle ones closed after the timeout,
a cap on connections, and a large exposition sent whole."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

from service.telemetry.metrics import FrontMetrics, _MetricsServer, start_metrics_server, stop_metrics_server


def scrape(port: int, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as resp:
        assert resp.status == 200
        return resp.read()


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes `sock` (EOF or reset) within `seconds`."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_200_idle_connections_hold_no_threads_and_scrapes_still_answer_then_they_are_closed():
    m = FrontMetrics()
    m.request("Generate").finish("OK")
    timeout_s = 1.5
    port = start_metrics_server(m, "127.0.0.1", 0, timeout_s=timeout_s)
    idle: list[socket.socket] = []
    try:
        scrape(port)  # the render thread exists from here
        before = threading.active_count()
        for _ in range(200):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        idle[0].sendall(b"GET /metr")  # a slow head is no better than none
        t = time.monotonic()
        body = scrape(port)
        assert time.monotonic() - t < 2.0 and b'dgemma_front_requests_total{code="OK",method="Generate"} 1.0' in body
        # before: 200 more threads (ThreadingHTTPServer), still held 5 s later
        assert threading.active_count() - before <= 2, threading.active_count() - before
        t = time.monotonic()
        assert all(closed_within(s, timeout_s + 3.0 - (time.monotonic() - t)) for s in idle)
        assert time.monotonic() - t < timeout_s + 3.0
        assert threading.active_count() - before <= 2
    finally:
        for s in idle:
            s.close()
        stop_metrics_server(port)


def test_past_the_connection_cap_new_connections_are_closed_at_once_until_slots_free():
    port = start_metrics_server(FrontMetrics(), "127.0.0.1", 0, timeout_s=1.0, max_connections=4)
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(4)]
    try:
        time.sleep(0.2)  # accepted
        extra = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert closed_within(extra, 0.5)
        extra.close()
        end = time.monotonic() + 5
        while True:  # the held ones time out after 1 s: scrapes answer again
            try:
                assert scrape(port, 2.0)
                break
            except OSError:
                assert time.monotonic() < end, "no slot came back"
                time.sleep(0.2)
    finally:
        for s in held:
            s.close()
        stop_metrics_server(port)


def test_a_large_exposition_is_sent_whole_and_other_paths_are_refused():
    big = b"# " + b"x" * (4 << 20) + b"\n"
    server = _MetricsServer(lambda: big, "127.0.0.1", 0, 5.0, 8)
    try:
        assert scrape(server.port, 10.0) == big
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(64).startswith(b"HTTP/1.1 405")
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            try:  # a head over 8 KiB: closed, no answer (the close may cut the send short)
                s.sendall(b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n")
            except ConnectionError:
                pass
            assert closed_within(s, 3.0)
    finally:
        server.stop()
