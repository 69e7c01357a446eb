"""The HTTP front's request bodies: OpenAI's fields implemented, refused (naming the field) or ignored."""

import json

import pytest

from service.errors import InvalidArgument
from service.front.openai_structured import tool_ask
from service.front.openai_schema import (
    IGNORED,
    UNSUPPORTED,
    ChatRequest,
    CompletionRequest,
    chat_extras,
    chat_of,
    parse,
    prompts_of,
)


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


def test_a_completion_body_with_extensions_and_ignored_fields():
    r, ignored = parse(CompletionRequest, body(prompt="def ", max_tokens=64, n=2, seed=3, stream=True, t_min=0.2,
                                               sampler="fast", user="u1", temperature=None, logprobs=False, top_p=1,
                                               frobnicate={"x": 1}))
    assert (r.prompt, r.max_tokens, r.n, r.seed, r.stream, r.sampler) == ("def ", 64, 2, 3, True, "fast")
    assert r.diffusion_params()["t_min"] == 0.2 and r.diffusion_params()["max_denoising_steps"] is None
    assert sorted(ignored) == ["frobnicate", "user"]  # unknown and known-ignored fields, dropped and named


def test_temperature_and_top_k_reach_the_diffusion_parameters():
    p = parse(CompletionRequest, body(prompt="a", temperature=0, top_k=-1, top_p=1))[0].diffusion_params()
    assert (p["temperature"], p["top_k"]) == (0, 0)  # vLLM's top_k -1 is off; top_p 1 is OpenAI's no-op
    p = parse(CompletionRequest, body(prompt="a", temperature=0.7, top_k=40))[0].diffusion_params()
    assert (p["temperature"], p["top_k"]) == (0.7, 40)


def test_stop_forms():
    stops = lambda **f: parse(CompletionRequest, body(prompt="a", **f))[0].stops()  # noqa: E731
    assert stops() == [] and stops(stop="") == [] and stops(stop=[]) == [] and stops(stop=None) == []
    assert stops(stop="\n") == ["\n"] and stops(stop=["a", "b"]) == ["a", "b"]


def test_length_aliases_and_stream_options():
    r, _ = parse(CompletionRequest, body(prompt="a", max_tokens=5, max_completion_tokens=7))
    assert r.length() == (7, "max_completion_tokens")
    assert parse(CompletionRequest, body(prompt="a", max_tokens=5))[0].length() == (5, "max_tokens")
    with pytest.raises(InvalidArgument) as e:
        parse(CompletionRequest, body(prompt="a", stream_options={"include_usage": True}))[0].checked_stream_options()
    assert e.value.field == "stream_options"
    r, _ = parse(CompletionRequest, body(prompt="a", stream=True, stream_options={"continuous_usage_stats": True,
                                                                                   "x": 1}))
    assert r.checked_stream_options().continuous_usage_stats and not r.checked_stream_options().include_usage


@pytest.mark.parametrize("raw, field", [
    (b"{not json", "body"),
    (b"[1, 2]", "body"),
    (body(), "prompt"),
    (body(prompt="a", n="3"), "n"),  # strict: no string-to-int coercion
    (body(prompt="a", sampler="greedy"), "sampler"),
    (body(prompt="a", temperature="hot"), "temperature"),
    (body(prompt="a", top_p=0.9), "top_p"),
    (body(prompt="a", stop=3), "stop"),
    (body(prompt="a", stop_token_ids="1"), "stop_token_ids"),
    (body(prompt="a", best_of=3), "best_of"),
    (body(prompt="a", stream_options=[]), "stream_options"),
])
def test_bad_completion_bodies_name_the_field(raw, field):
    with pytest.raises(InvalidArgument) as e:
        parse(CompletionRequest, raw)
    assert e.value.field == field


def test_chat_bodies_and_messages():
    r, _ = parse(ChatRequest, body(messages=[{"role": "developer", "content": "be brief"},
                                             {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                          {"type": "text", "text": "b"}]}],
                                   max_completion_tokens=8))
    assert chat_of(r.messages) == [("system", "be brief"), ("user", "ab")] and r.max_completion_tokens == 8
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    r, _ = parse(ChatRequest, body(messages=[{"role": "assistant", "content": None, "tool_calls": calls},
                                             {"role": "tool", "tool_call_id": "c1", "content": "42", "refusal": None}]))
    assert chat_of(r.messages) == [("assistant", ""), ("tool", "42")]
    assert chat_extras(r.messages) == [{"tool_calls": calls}, {"tool_call_id": "c1"}]
    with pytest.raises(InvalidArgument) as e:
        parse(ChatRequest, body(messages=[{"role": "user", "content": "x", "tool_calls": "no"}]))
    assert e.value.field == "messages[0].tool_calls"
    with pytest.raises(InvalidArgument) as e:
        chat_of(parse(ChatRequest, body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]))[0].messages)
    assert e.value.field == "messages[0].content[0]"
    with pytest.raises(InvalidArgument) as e:  # tools are parsed as they come, and checked by tool_ask
        r, _ = parse(ChatRequest, body(messages=[{"role": "user", "content": "x"}], tools=[{"type": "function"}]))
        tool_ask(r.tools, r.tool_choice)
    assert e.value.field == "tools[0]"


def test_prompt_forms():
    assert prompts_of("a") == ["a"] and prompts_of([2, 5]) == [[2, 5]] and prompts_of(["a"]) == ["a"]
    assert prompts_of([[2, 5]]) == [[2, 5]] and prompts_of(["a", [3], "b"]) == ["a", [3], "b"]
    for bad, field in (([1.5], "prompt[0]"), ([True], "prompt[0]"), (None, "prompt"), ({"text": "a"}, "prompt"),
                       ([], "prompt"), ([[]], "prompt[0]"), (["a", 3], "prompt[1]"), (["a"] * 65, "prompt")):
        with pytest.raises(InvalidArgument) as e:
            prompts_of(bad)
        assert e.value.field == field, bad


def test_every_policy_field_is_documented():
    doc = open("docs/api.md").read()
    for name in [*UNSUPPORTED, *IGNORED]:
        assert f"`{name}`" in doc, name
