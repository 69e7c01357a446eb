"""The HTTP front's limits on a real uvicorn server on 127.0.0.1 with a stand-in Triton: the call limit (429,
health exempt, slots back), the body timeout (408), X-Request-Timeout's values and its start at arrival,
x-request-id validated before it is logged, and the bounded tokenizer pool."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import socket
import threading
import time

import pytest

from service import DEFAULT_CHECKPOINT
from service.front.auth import BearerKeys
from service.front.call_limit import CallLimit
from service.front.http_server import HttpServer
from service.front.openai_api import OpenAIApi
from service.request.catalog import ServedModel
from service.request.dispatch import Dispatcher
from service.request.triton_client import BackendEvent
from service.telemetry.metrics import FrontMetrics

COMPLETION = json.dumps({"prompt": "hi", "max_tokens": 4}).encode()


class StandinTriton:
    """One final event per stream, once `gate` is open (None: at once); records the timeout each stream was
    given."""

    def __init__(self) -> None:
        self.gate: asyncio.Event | None = None
        self.timeouts: list[float | None] = []

    async def stream(self, inputs, *, request_id="", timeout=None, metadata=(), field_names=None):
        self.timeouts.append(timeout)
        if self.gate is not None:
            await asyncio.wait_for(self.gate.wait(), 30)
        yield BackendEvent("final", [5], "x", 0, 1, {"generated_tokens": 1}, "eos")


class Front:
    """OpenAIApi + HttpServer in an event loop on a thread of its own."""

    def __init__(self, limit: int = 2, body_timeout_s: float = 1.0, max_timeout_s: float = 600.0) -> None:
        model = ServedModel.load(DEFAULT_CHECKPOINT, "diffusiongemma", "torch-float32-cpu")
        self.triton = StandinTriton()
        self.slots = CallLimit(limit)
        self.dispatcher = Dispatcher(model, self.triton, 64, tokenizer_threads=2)
        self.api = OpenAIApi(self.dispatcher, FrontMetrics(), BearerKeys([]), lambda: True, lambda: b"", 1 << 20,
                             self.slots, body_timeout_s, max_timeout_s)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.server = self.call(self._start())
        self.port = self.server.port

    async def _start(self) -> HttpServer:
        server = HttpServer(self.api.app, "127.0.0.1", 0)
        await server.start()
        return server

    def call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 10.0) -> tuple[int, dict, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body, {"content-type": "application/json", **(headers or {})})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(r.read() or b"null")
        finally:
            conn.close()

    def close(self) -> None:
        self.call(self.server.stop(1))
        self.dispatcher.close()
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def front():
    f = Front()
    yield f
    f.close()


def wait_for(predicate, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_past_the_call_limit_a_429_naming_it_while_health_answers_then_the_slots_come_back(front):
    front.triton.gate = gate = asyncio.Event()
    held = [threading.Thread(target=front.request, args=("POST", "/v1/completions", COMPLETION)) for _ in range(2)]
    for t in held:
        t.start()
    assert wait_for(lambda: front.slots.active == 2, 5.0)
    status, _, doc = front.request("POST", "/v1/completions", COMPLETION)
    assert status == 429, doc
    assert doc["error"]["type"] == "rate_limit_error" and doc["error"]["code"] == "resource_exhausted"
    assert doc["error"]["message"] == "too many concurrent calls (this server's limit is 2); retry later"
    assert front.request("GET", "/v1/models")[0] == 429  # every API route counts
    # health is exempt: a pod at its limit still passes its probes
    assert front.request("GET", "/v1/health/ready")[0] == 200 and front.request("GET", "/v1/health/live")[0] == 200
    front.loop.call_soon_threadsafe(gate.set)
    for t in held:
        t.join(10)
    assert wait_for(lambda: front.slots.active == 0, 5.0)
    assert front.request("POST", "/v1/completions", COMPLETION)[0] == 200
    # the slot comes back once the exchange ends, just after its last byte reached the client
    assert wait_for(lambda: front.slots.active == 0, 5.0)


def test_a_slow_body_gets_a_408_within_the_timeout_and_its_slot_back(front):
    with socket.create_connection(("127.0.0.1", front.port), timeout=10) as s:
        t = time.monotonic()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"prompt\"")
        assert wait_for(lambda: front.slots.active == 1, 2.0)  # the slow sender holds a slot while it sends
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
        elapsed = time.monotonic() - t
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b"connection: close" in reply.lower() and b"did not arrive within 1 s" in reply
        assert 0.9 < elapsed < 3.0, elapsed
        assert s.recv(1) == b""  # and the connection is closed
    assert wait_for(lambda: front.slots.active == 0, 2.0)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "-1", "0", "abc", "1e309", ""])
def test_a_bad_request_timeout_is_a_400_naming_the_header(front, caplog, value):
    with caplog.at_level(logging.INFO):
        status, _, doc = front.request("POST", "/v1/completions", COMPLETION, {"x-request-timeout": value})
    assert status == 400, doc
    assert doc["error"]["param"] == "x-request-timeout" and doc["error"]["type"] == "invalid_request_error"
    assert not any(r.exc_info for r in caplog.records)  # no traceback logged
    assert front.triton.timeouts == []  # never reached the model


def test_a_huge_request_timeout_is_the_servers_cap(front):
    status, _, doc = front.request("POST", "/v1/completions", COMPLETION, {"x-request-timeout": "1e300"})
    assert status == 200, doc
    assert front.triton.timeouts and 590 < front.triton.timeouts[0] <= 600  # NIM_MAX_REQUEST_SECONDS here


def test_the_deadline_counts_from_arrival_not_from_the_end_of_the_body():
    """A 3 s deadline whose body took about 1.5 s to arrive has about 1.5 s left when it reaches the model (before:
    the whole 3 s, counted after the body was read and tokenized)."""
    front, body = Front(body_timeout_s=5.0), COMPLETION
    try:
        with socket.create_connection(("127.0.0.1", front.port), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"X-Request-Timeout: 3\r\nContent-Length: %d\r\n\r\n" % len(body))
            for i in range(3):
                time.sleep(0.5)
                s.sendall(body[i * 4:(i + 1) * 4])
            s.sendall(body[12:])
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        front.close()
    assert len(front.triton.timeouts) == 1 and front.triton.timeouts[0] < 2.0, front.triton.timeouts


def test_a_request_timeout_that_passes_while_the_body_arrives_is_a_504(front):
    with socket.create_connection(("127.0.0.1", front.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Request-Timeout: 0.3\r\nContent-Length: 50\r\n\r\n{")
        reply = b""
        while chunk := s.recv(4096):  # to the end: the connection is closed after it
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 504") and b"timeout_error" in reply, reply[:200]
    assert wait_for(lambda: front.slots.active == 0, 2.0)


def test_a_bad_request_id_is_refused_before_it_is_logged(front, caplog):
    raw = "forged\tline"  # HTTP/1.1 allows a tab in a header value
    with caplog.at_level(logging.DEBUG):
        status, headers, doc = front.request("POST", "/v1/completions", COMPLETION, {"x-request-id": raw})
    assert status == 400 and doc["error"]["param"] == "x-request-id", doc
    assert headers["x-request-id"] != raw  # the refusal carries a fresh id
    for r in caplog.records:
        assert raw not in r.getMessage() and raw not in str(getattr(r, "request_id", ""))


def test_the_tokenizer_pool_is_bounded():
    model = ServedModel.load(DEFAULT_CHECKPOINT, "diffusiongemma", "torch-float32-cpu")
    d = Dispatcher(model, None, tokenizer_threads=2)
    running, most, names = 0, 0, set()
    lock = threading.Lock()

    def work(pause: float = 0.0) -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            names.add(threading.current_thread().name)
        time.sleep(pause)
        with lock:
            running -= 1

    async def main() -> None:
        await asyncio.gather(*(d.offload(work, pause=0.05) for _ in range(12)))  # keywords pass too

    try:
        asyncio.run(main())
    finally:
        d.close()
    assert most == 2 and len(names) == 2 and all(n.startswith("dgemma-tokenize") for n in names)


def test_a_connection_that_sends_nothing_is_closed_after_the_keep_alive_timeout(front):
    """uvicorn starts its keep-alive timer only after a response: a client that connects and sends nothing
    held its connection for as long as it liked. Now it is closed after `timeout_keep_alive` (5 s)."""
    import socket

    timeout = front.server.server.config.timeout_keep_alive
    with socket.create_connection(("127.0.0.1", front.port), timeout=timeout + 5) as s:
        start = time.monotonic()
        assert s.recv(1) == b""  # the server closed it, without an answer
        assert timeout - 0.5 <= time.monotonic() - start <= timeout + 3
    assert front.request("GET", "/v1/health/live")[0] == 200  # a client that speaks is served as before
