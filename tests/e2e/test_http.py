"""The OpenAI-compatible HTTP API of the running `dgemma serve` (the shared server: auth on, tracing on),
called with the official `openai` SDK and with plain HTTP (httpx), checked against the gRPC API."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from service.api.diffusiongemma.v1 import diffusiongemma_pb2 as pb
from tests.e2e.conftest import API_KEY, MAX_CONCURRENT
from tests.e2e.test_operations import wait_until

STEPS = {"max_denoising_steps": 8}
PARAMS = pb.DiffusionParameters(max_denoising_steps=8)
CHAT = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Add two numbers."}]
# long enough to still be running when the test acts (as tests/e2e/test_operations.py's LONG)
LONG = {"prompt": "class ", "max_tokens": 64 * 40, "max_denoising_steps": 200, "confidence_threshold": 0.0}


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http_url, timeout=120,
                      headers={"authorization": f"Bearer {API_KEY}"}) as client:
        yield client


def grpc_generate(server, **prompt) -> pb.GenerateResponse:
    request = pb.GenerateRequest(max_new_tokens=128, options=pb.GenerationOptions(
        parameters=PARAMS, seed=11, num_variations=3), **prompt)
    return server.stub().Generate(request, metadata=server.metadata(), timeout=120)


@pytest.fixture(scope="module")
def grpc_text(server) -> pb.GenerateResponse:
    return grpc_generate(server, text="def ")


@pytest.fixture(scope="module")
def grpc_chat(server) -> pb.GenerateResponse:
    return grpc_generate(server, chat=pb.Chat(messages=[pb.ChatMessage(**m) for m in CHAT]))


def expect_same(choices, grpc_response: pb.GenerateResponse, text_of) -> None:
    assert [c.index for c in choices] == [0, 1, 2]
    for c, g in zip(choices, grpc_response.choices):
        assert c.model_extra["token_ids"] == list(g.token_ids) and c.model_extra["seed"] == g.seed
        assert text_of(c) == g.text
        assert c.finish_reason == {pb.FINISH_REASON_EOS: "stop", pb.FINISH_REASON_LENGTH: "length"}[g.finish_reason]
    assert len({tuple(c.model_extra["token_ids"]) for c in choices}) == 3  # seeds 11, 12, 13


def test_health_is_not_ready_while_the_model_loads_then_ready(server):
    assert (200, 503) in server.loading_health, server.loading_health[:5]
    assert server.http_status("/v1/health/live") == 200 and server.http_status("/v1/health/ready") == 200


def test_completions_match_grpc_for_the_same_seed(oai, grpc_text):
    r = oai.completions.create(model="diffusiongemma", prompt="def ", max_tokens=128, n=3, seed=11, extra_body=STEPS)
    assert r.object == "text_completion" and r.model == "diffusiongemma" and r.id.startswith("cmpl-")
    expect_same(r.choices, grpc_text, lambda c: c.text)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (grpc_text.usage.prompt_tokens,
                                                                  grpc_text.usage.completion_tokens)


def test_streamed_completions_send_canvases_that_add_up_to_the_grpc_text(oai, grpc_text):
    chunks = list(oai.completions.create(model="diffusiongemma", prompt="def ", max_tokens=128, n=3, seed=11,
                                         stream=True, stream_options={"include_usage": True}, extra_body=STEPS))
    text, finals = {0: "", 1: "", 2: ""}, {}
    for ch in chunks[:-1]:
        (c,) = ch.choices
        text[c.index] += c.text
        if c.finish_reason:
            finals[c.index] = c
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == grpc_text.usage.completion_tokens
    expect_same([finals[i] for i in range(3)], grpc_text, lambda c: text[c.index])
    canvases = [ch for ch in chunks if ch.choices and ch.choices[0].model_extra.get("canvas_index") is not None]
    assert len(canvases) == 3 * 2  # 128 tokens: two canvases per variation, one chunk each


def test_chat_completions_match_grpc_streamed_and_not(oai, grpc_chat):
    r = oai.chat.completions.create(model="diffusiongemma", messages=CHAT, max_tokens=128, n=3, seed=11,
                                    extra_body=STEPS)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert all(c.message.role == "assistant" for c in r.choices)
    expect_same(r.choices, grpc_chat, lambda c: c.message.content)

    text, finals, roles = {0: "", 1: "", 2: ""}, {}, {}
    for ch in oai.chat.completions.create(model="diffusiongemma", messages=CHAT, max_tokens=128, n=3, seed=11,
                                          stream=True, extra_body=STEPS):
        (c,) = ch.choices
        roles.setdefault(c.index, c.delta.role)
        text[c.index] += c.delta.content or ""
        if c.finish_reason:
            finals[c.index] = c
    assert roles == {0: "assistant", 1: "assistant", 2: "assistant"}
    expect_same([finals[i] for i in range(3)], grpc_chat, lambda c: text[c.index])


def test_return_drafts_streams_each_step_in_an_extra_field(http):
    body = {"prompt": "import ", "max_tokens": 64, "stream": True, "return_drafts": True, "max_denoising_steps": 5,
            "confidence_threshold": 0.0}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln.removeprefix("data: ") for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    choices = [json.loads(ln)["choices"][0] for ln in lines[:-1]]
    drafts = [c["draft"] for c in choices if "draft" in c]
    assert [d["step"] for d in drafts] == [1, 2, 3, 4, 5] and all(c["text"] == "" for c in choices if "draft" in c)
    last = choices[-1]
    assert last["finish_reason"] in ("stop", "length") and last["token_ids"][:64] == drafts[-1]["token_ids"]


def test_infill_with_suffix_matches_grpc_infill(server, oai):
    prefix, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    r = oai.completions.create(model="diffusiongemma", prompt=prefix, suffix=suffix, max_tokens=8, n=2, seed=3,
                               extra_body=STEPS)
    g = server.stub().Infill(pb.InfillRequest(prefix=prefix, suffix=suffix, gap_tokens=8, options=pb.GenerationOptions(
        parameters=PARAMS, seed=3, num_variations=2)), metadata=server.metadata(), timeout=120)
    assert [c.text for c in r.choices] == [c.infill for c in g.choices]
    assert [c.model_extra["token_ids"] for c in r.choices] == [list(c.infill_token_ids) for c in g.choices]


def test_models_and_tokenize(server, oai, http):
    (m,) = oai.models.list().data
    assert m.id == "diffusiongemma" and m.object == "model" and m.model_extra["canvas_length"] == 64
    assert m.model_extra["default_parameters"]["max_denoising_steps"] == 48
    t = http.post("/v1/tokenize", json={"prompt": "def add(a, b):"}).json()
    g = server.stub().Tokenize(pb.TokenizeRequest(text="def add(a, b):"), metadata=server.metadata(), timeout=10)
    assert t["tokens"] == list(g.token_ids) and t["token_strs"] == list(g.tokens) and t["count"] == len(g.token_ids)


@pytest.mark.parametrize("route, body, field", [
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {}, "prompt"),
    ("completions", {"prompt": [2, 99999]}, "prompt[1]"),
    ("completions", {"prompt": "a", "max_denoising_steps": 0}, "max_denoising_steps"),
    ("completions", {"prompt": "a", "t_min": 0.9, "t_max": 0.5}, "t_max"),
    ("completions", {"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": "a", "n": 99}, "n"),
    ("completions", {"prompt": "a", "sampler": "greedy"}, "sampler"),
    ("completions", {"prompt": "a", "suffix": "b", "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": "a", "temperature": 3}, "temperature"),
    ("completions", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("completions", {"prompt": "a", "logprobs": 6}, "logprobs"),
    ("completions", {"prompt": "a", "logprobs": 1, "suffix": "b"}, "logprobs"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("completions", {"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
    ("chat", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools[0]"),
])
def test_bad_input_is_a_bad_request_naming_the_field(oai, route, body, field):
    body = {"model": "diffusiongemma", **body}
    with pytest.raises(openai.BadRequestError) as e:  # raw bodies: the SDK's types would refuse some first
        oai.post("/chat/completions" if route == "chat" else "/completions", body=body, cast_to=object)
    assert e.value.status_code == 400 and e.value.param == field, e.value.message
    assert e.value.type == "invalid_request_error" and e.value.body["message"].startswith(field)
    assert "Traceback" not in e.value.message and ".py" not in e.value.message


def test_unknown_model_is_not_found_and_the_server_keeps_serving(oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="gpt-x", prompt="a", max_tokens=8)
    assert e.value.param == "model" and "gpt-x" in e.value.message
    assert oai.completions.create(model="diffusiongemma", prompt="a", max_tokens=8, extra_body=STEPS).choices


def test_auth_body_limit_metrics_and_open_health(server, http):
    for headers in ({}, {"authorization": "Bearer wrong-key"}):
        with httpx.Client(base_url=server.http_url, headers=headers, timeout=30) as bare:
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions")):
                r = bare.request(method, path, json={"prompt": "a"})
                assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            assert bare.get("/v1/health/live").status_code == 200 and bare.get("/v1/health/ready").status_code == 200
            metrics = bare.get("/v1/metrics")
    assert metrics.status_code == 200
    assert 'dgemma_front_requests_total{code="UNAUTHENTICATED",method="POST /v1/completions"}' in metrics.text
    assert "nv_inference_request_success" in metrics.text  # Triton's exposition, as on the metrics port
    r = http.post("/v1/completions", content=b'{"prompt": "' + b"a" * (2 << 20) + b'"}')
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"


def _next_event(lines) -> dict:
    """The next SSE event from `lines` (a response's iter_lines(): keep it referenced, since a line
    iterator that is garbage-collected closes the connection, which is a client disconnect)."""
    for line in lines:
        if line.startswith("data: "):
            return json.loads(line.removeprefix("data: "))
    raise AssertionError("the stream ended without an event")


def test_overload_is_429_at_once_and_accepted_streams_continue(server, http):
    body = {**LONG, "stream": True, "return_drafts": True}
    streams = [http.stream("POST", "/v1/completions", json=body) for _ in range(MAX_CONCURRENT)]
    try:
        responses = [s.__enter__() for s in streams]
        lines = [r.iter_lines() for r in responses]
        for r, it in zip(responses, lines):
            assert r.status_code == 200 and "draft" in _next_event(it)["choices"][0]
        t0 = time.monotonic()
        r = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 8, **STEPS})
        assert r.status_code == 429 and time.monotonic() - t0 < 2
        assert r.json()["error"]["type"] == "rate_limit_error" and "retry" in r.json()["error"]["message"]
        assert all("draft" in _next_event(it)["choices"][0] for it in lines)  # still served
    finally:
        for s in streams:
            s.__exit__(None, None, None)  # closing the connection is the client's disconnect
    assert wait_until(lambda: server.live_canvases() == 0, timeout=30)


def test_client_disconnect_frees_the_engine_slot_streamed_or_not(server, http):
    with http.stream("POST", "/v1/completions", json={**LONG, "stream": True, "return_drafts": True}) as r:
        lines = r.iter_lines()
        assert "draft" in _next_event(lines)["choices"][0]
        assert wait_until(lambda: (server.live_canvases() or 0) >= 1)
        assert "draft" in _next_event(lines)["choices"][0]  # still running until the client leaves
    assert wait_until(lambda: server.live_canvases() == 0)
    assert wait_until(lambda: server.metric("dgemma_front_inflight_requests") == 0)

    def leave_early():  # a plain request whose client gives up after 2 s
        with pytest.raises(httpx.TimeoutException):
            http.post("/v1/completions", json=LONG, timeout=2)

    t = threading.Thread(target=leave_early)
    t.start()
    assert wait_until(lambda: (server.live_canvases() or 0) >= 1)
    t.join(30)
    assert wait_until(lambda: server.live_canvases() == 0)
    cancelled = server.metric("dgemma_front_requests_total", method="POST /v1/completions", code="CANCELLED")
    assert cancelled is not None and cancelled >= 2


def test_request_timeout_header_is_504_and_frees_the_slot(server, http):
    t0 = time.monotonic()
    r = http.post("/v1/completions", json=LONG, headers={"x-request-timeout": "1"})
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error" and time.monotonic() - t0 < 10
    assert wait_until(lambda: server.live_canvases() == 0)


def test_one_trace_from_the_http_call_through_triton(http, otlp):
    trace_id = "4bf92f3577b34e0e8a0c1f0e4d2a9c11"
    r = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 8, "max_denoising_steps": 4},
                  headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01", "x-request-id": "http-trace-1"})
    assert r.status_code == 200 and r.json()["id"] == "cmpl-http-trace-1"
    fronts = otlp.wait_for(lambda s: s.name == "POST /v1/completions" and s.trace_id == trace_id, timeout=20)
    assert fronts and fronts[0].attributes["dgemma.request_id"] == "http-trace-1"
    assert fronts[0].parent_span_id == "00f067aa0ba902b7" and fronts[0].service_name == "dgemma-front"

    def triton_child():
        return [s for s in otlp.spans() if s.trace_id == trace_id and s.service_name == "triton-inference-server"
                and s.parent_span_id == fronts[0].span_id]

    # Triton's request span (a child of ours) ends with the stream and is exported on Triton's own schedule
    assert wait_until(triton_child, timeout=90), [(s.name, s.parent_span_id) for s in otlp.spans()
                                                  if s.trace_id == trace_id]
    assert wait_until(lambda: any(s.name == "dgemma.canvas" for s in otlp.spans() if s.trace_id == trace_id),
                      timeout=20)


def test_a_repeated_long_prompt_is_served_from_the_prefix_cache(server, oai, http):
    prompt = "".join(f"def handler_{i}(event):\n    return route(event, {i})\n" for i in range(30))  # > 256 tokens
    body = {"model": "diffusiongemma", "prompt": prompt, "max_tokens": 16, "seed": 5, "extra_body": STEPS}
    first, second = (oai.completions.create(**body) for _ in range(2))
    assert first.usage.prompt_tokens > 256 and second.usage.prompt_tokens == first.usage.prompt_tokens
    assert second.choices[0].text == first.choices[0].text  # the same ids with the cache as without
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 256 and cached % 256 == 0 and cached <= second.usage.prompt_tokens
    metrics = http.get("/v1/metrics").text
    hits = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
            if line.startswith("dgemma_prefix_cache_hit_tokens_total{")]
    assert hits and hits[0] >= cached
    assert "dgemma_prefix_cache_bytes{" in metrics and "dgemma_prefix_cache_hit_rate{" in metrics
    over_grpc = server.stub().Generate(pb.GenerateRequest(text=prompt, max_new_tokens=16, options=pb.GenerationOptions(
        parameters=PARAMS, seed=5)), metadata=server.metadata(), timeout=120)
    assert over_grpc.usage.cached_prompt_tokens == cached and over_grpc.choices[0].text == first.choices[0].text
