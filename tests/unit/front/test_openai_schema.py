"""The HTTP front's request bodies: OpenAI's fields implemented, refused (naming the field) or ignored."""

import json

import pytest

from service.errors import InvalidArgument
from service.front.openai_schema import (
    IGNORED,
    UNSUPPORTED,
    ChatRequest,
    CompletionRequest,
    chat_of,
    parse,
    prompt_of,
)


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


def test_a_completion_body_with_extensions_and_ignored_fields():
    r = parse(CompletionRequest, body(prompt="def ", max_tokens=64, n=2, seed=3, stream=True, t_min=0.2,
                                      sampler="fast", user="u1", temperature=None, logprobs=False, top_p=1))
    assert (r.prompt, r.max_tokens, r.n, r.seed, r.stream, r.sampler) == ("def ", 64, 2, 3, True, "fast")
    assert r.diffusion_params()["t_min"] == 0.2 and r.diffusion_params()["max_denoising_steps"] is None


@pytest.mark.parametrize("raw, field", [
    (b"{not json", "body"),
    (b"[1, 2]", "body"),
    (body(), "prompt"),
    (body(prompt="a", n="3"), "n"),  # strict: no string-to-int coercion
    (body(prompt="a", sampler="greedy"), "sampler"),
    (body(prompt="a", stream_options={"include_usage": True, "x": 1}), "stream_options.x"),
    (body(prompt="a", temperature=0.7), "temperature"),
    (body(prompt="a", stop=["\n"]), "stop"),
    (body(prompt="a", best_of=3), "best_of"),
    (body(prompt="a", frobnicate=1), "frobnicate"),
])
def test_bad_completion_bodies_name_the_field(raw, field):
    with pytest.raises(InvalidArgument) as e:
        parse(CompletionRequest, raw)
    assert e.value.field == field


def test_chat_bodies_and_messages():
    r = parse(ChatRequest, body(messages=[{"role": "developer", "content": "be brief"},
                                          {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                       {"type": "text", "text": "b"}]}],
                                max_completion_tokens=8))
    assert chat_of(r.messages) == [("system", "be brief"), ("user", "ab")] and r.max_completion_tokens == 8
    with pytest.raises(InvalidArgument) as e:
        parse(ChatRequest, body(messages=[{"role": "user", "content": "x", "tool_calls": []}]))
    assert e.value.field == "messages[0].tool_calls"
    with pytest.raises(InvalidArgument) as e:
        chat_of(parse(ChatRequest, body(messages=[{"role": "user", "content": [{"type": "image_url"}]}])).messages)
    assert e.value.field == "messages[0].content[0]"
    with pytest.raises(InvalidArgument) as e:
        parse(ChatRequest, body(messages=[{"role": "user", "content": "x"}], tools=[{"type": "function"}]))
    assert e.value.field == "tools"


def test_prompt_forms():
    assert prompt_of("a") == "a" and prompt_of([2, 5]) == [2, 5] and prompt_of(["a"]) == "a"
    assert prompt_of([[2, 5]]) == [2, 5]
    for bad in (["a", "b"], [1.5], [True], None, {"text": "a"}):
        with pytest.raises(InvalidArgument) as e:
            prompt_of(bad)
        assert e.value.field == "prompt"


def test_every_policy_field_is_documented():
    doc = open("docs/api.md").read()
    for name in [*UNSUPPORTED, *IGNORED]:
        assert f"`{name}`" in doc, name
