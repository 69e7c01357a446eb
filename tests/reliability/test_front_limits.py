"""The front's limits on a real `dgemma serve`: oversize text refused before tokenizing with the field named
(gRPC and HTTP), the gRPC message cap, and the cap on concurrent RPCs (health checks exempt); the server
stays SERVING."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import grpc
import pytest

from service.api.diffusiongemma.v1 import diffusiongemma_pb2 as pb
from tests.reliability.conftest import CONCURRENT_RPCS, MESSAGE_BYTES, PROMPT_BYTES

BIG = "word " * ((PROMPT_BYTES + 1000) // 5)  # over the prompt cap, under the message cap


def grpc_error(fn, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn(request, timeout=10)
    return e.value


def post(srv, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(srv.http_url + path, json.dumps(body).encode(),
                                 {"content-type": "application/json"})
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


def test_concurrent_rpc_cap_then_recovery(limited_server):
    stub = limited_server.stub()
    slow = pb.GenerateRequest(text="x", max_new_tokens=4096, return_drafts=True, options=pb.GenerationOptions(
        parameters=pb.DiffusionParameters(max_denoising_steps=1000, confidence_threshold=0.0)))
    streams = [stub.GenerateStream(slow, timeout=60) for _ in range(CONCURRENT_RPCS)]
    try:
        for s in streams:  # each holds its slot once its first event arrives
            next(s)
        e = grpc_error(stub.ListModels, pb.ListModelsRequest())
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"limit is {CONCURRENT_RPCS}" in e.details()
        # health checks are exempt: a pod at its limit still passes its probes (before: RESOURCE_EXHAUSTED)
        assert [limited_server.health() for _ in range(3)] == ["SERVING"] * 3
    finally:
        for s in streams:
            s.cancel()
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            assert stub.ListModels(pb.ListModelsRequest(), timeout=5).models
            break
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            time.sleep(0.1)
    else:
        raise AssertionError("the slots never came back")
    assert limited_server.health() == "SERVING"
