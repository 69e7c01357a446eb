"""The front's limits on a real `dgemma serve`: oversize text refused before tokenizing with the field named
(gRPC and HTTP), the gRPC message cap, the cap on concurrent calls (gRPC and HTTP together, health checks
exempt), the HTTP body timeout, X-Request-Timeout's values, request ids checked before they are logged, and idle
connections on the metrics port; the server stays SERVING."""

from __future__ import annotations

import contextlib
import json
import socket
import time
import urllib.error
import urllib.request

import grpc
import pytest

from service.api.diffusiongemma.v1 import diffusiongemma_pb2 as pb
from tests.reliability.conftest import BODY_TIMEOUT_S, CONCURRENT_RPCS, MESSAGE_BYTES, PROMPT_BYTES

BIG = "word " * ((PROMPT_BYTES + 1000) // 5)  # over the prompt cap, under the message cap


def grpc_error(fn, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn(request, timeout=10)
    return e.value


def post(srv, path: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(srv.http_url + path, json.dumps(body).encode(),
                                 {"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("method, request_, field", [
    ("Generate", pb.GenerateRequest(text=BIG), "text"),
    ("Generate", pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=BIG)])),
     "chat.messages[0].content"),
    ("Tokenize", pb.TokenizeRequest(text=BIG), "text"),
    ("Infill", pb.InfillRequest(prefix=BIG, suffix="x", gap_tokens=2), "prefix"),
    ("Edit", pb.EditRequest(text="a b", instruction=BIG, editable=[pb.Span(start=0, end=1)]), "instruction"),
])
def test_oversize_text_is_refused_with_the_field_named(limited_server, method, request_, field):
    t = time.monotonic()
    e = grpc_error(getattr(limited_server.stub(), method), request_)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details().startswith(f"{field}: ") and f"limit of {PROMPT_BYTES} bytes" in e.details()
    assert time.monotonic() - t < 2.0


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": BIG, "max_tokens": 4}, "prompt"),
    ("/v1/completions", {"prompt": "a", "suffix": BIG, "max_tokens": 4}, "suffix"),
    ("/v1/completions", {"prompt": [5] * 9000, "max_tokens": 4}, None),  # ids: under the token cap, refused
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": BIG}]},
     "messages[1].content"),
    ("/v1/tokenize", {"prompt": BIG}, "prompt"),
])
def test_http_front_applies_the_same_limits(limited_server, path, body, param):
    status, doc = post(limited_server, path, body)
    assert status == 400, doc
    if param is not None:
        assert doc["error"]["param"] == param and f"limit of {PROMPT_BYTES} bytes" in doc["error"]["message"]
    else:  # 9,000 ids: over the 8,192-token default
        assert doc["error"]["param"] == "prompt" and "8192 prompt tokens" in doc["error"]["message"]


def test_grpc_message_cap(limited_server):
    e = grpc_error(limited_server.stub().Tokenize, pb.TokenizeRequest(text="x" * (MESSAGE_BYTES + 10)))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert limited_server.health() == "SERVING"


SLOW = pb.GenerateRequest(text="x", max_new_tokens=4096, return_drafts=True, options=pb.GenerationOptions(
    parameters=pb.DiffusionParameters(max_denoising_steps=1000, confidence_threshold=0.0)))


@contextlib.contextmanager
def all_slots_held(srv):
    """CONCURRENT_RPCS streams in flight, each holding its slot once its first event arrived."""
    streams = [srv.stub().GenerateStream(SLOW, timeout=60) for _ in range(CONCURRENT_RPCS)]
    try:
        for s in streams:
            next(s)
        yield
    finally:
        for s in streams:
            s.cancel()


def wait_for_slots(call, seconds: float = 10.0) -> None:
    """Until `call()` (raising RESOURCE_EXHAUSTED or returning False while the slots are taken) succeeds."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if call():
                return
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        time.sleep(0.1)
    raise AssertionError("the slots never came back")


def test_concurrent_rpc_cap_then_recovery(limited_server):
    stub = limited_server.stub()
    with all_slots_held(limited_server):
        e = grpc_error(stub.ListModels, pb.ListModelsRequest())
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"limit is {CONCURRENT_RPCS}" in e.details()
        # health checks are exempt: a pod at its limit still passes its probes (before: RESOURCE_EXHAUSTED)
        assert [limited_server.health() for _ in range(3)] == ["SERVING"] * 3
    wait_for_slots(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=5).models)
    assert limited_server.health() == "SERVING"


def test_http_calls_share_the_limit_and_health_stays_open(limited_server):
    """The gRPC streams hold every slot: HTTP API calls get 429 naming the limit (before: no limit on HTTP) while
    its health routes answer 200; once the streams end, HTTP calls succeed again."""
    with all_slots_held(limited_server):
        for path, body in (("/v1/completions", {"prompt": "a", "max_tokens": 4}), ("/v1/tokenize", {"prompt": "a"})):
            status, doc = post(limited_server, path, body)
            assert status == 429 and doc["error"]["type"] == "rate_limit_error", doc
            assert f"this server's limit is {CONCURRENT_RPCS}" in doc["error"]["message"]
        assert limited_server.http_status("/v1/models") == 429
        assert limited_server.http_status("/v1/health/ready") == 200
        assert limited_server.http_status("/v1/health/live") == 200
    wait_for_slots(lambda: post(limited_server, "/v1/tokenize", {"prompt": "a"})[0] == 200)


def slow_sender(srv) -> socket.socket:
    """A client that sends its headers and 1 byte of a 100-byte body, then nothing."""
    s = socket.create_connection(("127.0.0.1", srv.http_port), timeout=BODY_TIMEOUT_S + 10)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100\r\n\r\n{")
    return s


def status_of(s: socket.socket) -> int:
    head = s.recv(4096)
    return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0


def test_slow_bodies_get_a_408_within_the_timeout_and_their_slots_back(limited_server):
    """CONCURRENT_RPCS + 4 slow senders: the first CONCURRENT_RPCS take the slots (the rest: 429 at once), get 408
    within NIM_HTTP_BODY_TIMEOUT, and the slots come back (before: held for as long as the client liked)."""
    t = time.monotonic()
    senders = [slow_sender(limited_server) for _ in range(CONCURRENT_RPCS + 4)]
    try:
        statuses = [status_of(s) for s in senders]
        elapsed = time.monotonic() - t
    finally:
        for s in senders:
            s.close()
    assert sorted(statuses) == [408] * CONCURRENT_RPCS + [429] * 4, statuses
    assert elapsed < BODY_TIMEOUT_S + 3.0, elapsed
    wait_for_slots(lambda: post(limited_server, "/v1/tokenize", {"prompt": "a"})[0] == 200, 5.0)


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0", "abc", "1e309"])
def test_a_bad_request_timeout_header_is_a_400_naming_it(limited_server, value):
    status, doc = post(limited_server, "/v1/completions", {"prompt": "a", "max_tokens": 4},
                       {"x-request-timeout": value})
    assert status == 400 and doc["error"]["param"] == "x-request-timeout", doc


def test_a_huge_request_timeout_is_capped_not_a_500(limited_server):
    status, doc = post(limited_server, "/v1/completions", {"prompt": "a", "max_tokens": 4, "max_denoising_steps": 4},
                       {"x-request-timeout": "1e300"})
    assert status == 200, doc  # before: 500, an OverflowError's traceback in the log
    assert "Traceback" not in limited_server.log.read_text()


def test_a_request_id_with_a_newline_never_reaches_the_log(limited_server):
    forged = "r-1\nERROR dgemma.front: forged-line"
    e = grpc_error(limited_server.stub().Generate, pb.GenerateRequest(text="a", request_id=forged))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details().startswith("request_id: ")
    status, doc = post(limited_server, "/v1/completions", {"prompt": "a"}, {"x-request-id": "r-2\tforged-line"})
    assert status == 400 and doc["error"]["param"] == "x-request-id"
    assert "forged-line" not in limited_server.log.read_text()


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def test_idle_connections_on_the_metrics_port_hold_no_threads_and_are_closed(limited_server):
    """200 idle connections to the metrics port: the process's thread count stays where it was (before: one thread
    each, still held 5 s later), /metrics still answers, and the server closes them after its 5 s timeout."""
    pid, port = limited_server.proc.pid, limited_server.metrics_port
    before = threads_of(pid)
    idle = []
    try:
        for _ in range(200):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(0.5)
        during = threads_of(pid)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert r.status == 200 and b"dgemma_front_requests_total" in r.read()
        assert during - before < 10, (before, during)
        closed = 0
        end = time.monotonic() + 10
        for s in idle:
            s.settimeout(max(0.01, end - time.monotonic()))
            try:
                closed += s.recv(1) == b""
            except (TimeoutError, ConnectionResetError) as e:
                closed += isinstance(e, ConnectionResetError)
        assert closed == 200 and time.monotonic() < end
    finally:
        for s in idle:
            s.close()
