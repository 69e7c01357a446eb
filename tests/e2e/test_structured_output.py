"""Structured output and tool calls through the official `openai` SDK against the running `dgemma serve`: a
json_schema response parses and satisfies its schema for every seed, a forced tool call returns parseable
arguments, and what cannot be guaranteed is refused naming the field."""

from __future__ import annotations

import json

import openai
import pytest

from tests.e2e.conftest import API_KEY

STEPS = {"max_denoising_steps": 4}
# what the embedded checkpoint's 64-token canvas holds (its tokenizer spends 28 tokens on this skeleton)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "maximum": 99},
        "active": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "score", "active", "color"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {"note": {"anyOf": [{"type": "string"}, {"type": "null"}]}, "at": {"$ref": "#/$defs/Place"}},
    "$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string", "minLength": 2}}}},
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"},
                                                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                                                "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                                                "required": ["city", "unit", "days"]}}}


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def check(doc: dict) -> None:
    """What SCHEMA allows, checked by hand (no validator in the test extra)."""
    assert list(doc) == list(SCHEMA["properties"])
    assert isinstance(doc["name"], str) and len(doc["name"]) <= 8
    assert isinstance(doc["age"], int) and not isinstance(doc["age"], bool) and 0 <= doc["age"] <= 120
    assert isinstance(doc["score"], (int, float)) and not isinstance(doc["score"], bool) and doc["score"] <= 99
    assert isinstance(doc["active"], bool)
    assert doc["color"] in ("red", "green", "blue")


def test_json_schema_output_parses_and_validates_for_ten_seeds(oai):
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    seen = set()
    for seed in range(10):
        r = oai.chat.completions.create(model="diffusiongemma", messages=[{"role": "user", "content": "A person?"}],
                                        response_format=rf, seed=seed, extra_body=STEPS)
        c = r.choices[0]
        assert c.finish_reason == "stop"
        doc = json.loads(c.message.content)
        check(doc)
        seen.add(c.message.content)
        assert r.usage.completion_tokens > 0
    assert len(seen) > 1  # the values are generated, not fixed
    rf = {"type": "json_schema", "json_schema": {"name": "nested", "schema": NESTED}}
    r = oai.chat.completions.create(model="diffusiongemma", messages=[{"role": "user", "content": "Where?"}],
                                    response_format=rf, seed=0, extra_body=STEPS)
    doc = json.loads(r.choices[0].message.content)
    assert list(doc) == ["note", "at"] and isinstance(doc["note"], str) and len(doc["at"]["city"]) >= 2


def test_json_schema_on_completions_and_streamed(oai):
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    r = oai.completions.create(model="diffusiongemma", prompt="person: ", seed=3, n=2,
                               extra_body={**STEPS, "response_format": rf})
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        check(json.loads(c.text))
    chunks = list(oai.chat.completions.create(model="diffusiongemma", messages=[{"role": "user", "content": "A?"}],
                                              response_format=rf, seed=3, stream=True,
                                              stream_options={"include_usage": True}, extra_body=STEPS))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check(json.loads(text))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    ends = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert ends == ["stop"]


def test_a_forced_tool_call_returns_parseable_arguments(oai):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        r = oai.chat.completions.create(model="diffusiongemma", messages=messages, tools=[WEATHER], tool_choice=choice,
                                        seed=1, extra_body=STEPS)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        (call,) = c.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        args = json.loads(call.function.arguments)
        assert isinstance(args["city"], str) and args["unit"] in ("celsius", "fahrenheit") and 1 <= args["days"] <= 7
    # the call replayed in the history, with the tool's answer, goes through the chat template
    follow = oai.chat.completions.create(model="diffusiongemma", seed=1, max_tokens=8, extra_body=STEPS, messages=[
        *messages, c.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
    assert follow.choices[0].message.content is not None


def test_a_streamed_tool_call_and_a_function_without_arguments(oai):
    ping = {"type": "function", "function": {"name": "ping"}}
    r = oai.chat.completions.create(model="diffusiongemma", messages=[{"role": "user", "content": "ping"}],
                                    tools=[ping], tool_choice="required")
    assert r.choices[0].message.tool_calls[0].function.arguments == "{}"
    chunks = list(oai.chat.completions.create(model="diffusiongemma", messages=[{"role": "user", "content": "w?"}],
                                              tools=[WEATHER], tool_choice="required", seed=2, stream=True,
                                              extra_body=STEPS))
    calls = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    json.loads(calls[0].function.arguments)


@pytest.mark.parametrize("kw, param", [
    (dict(response_format={"type": "json_object"}), "response_format.type"),
    (dict(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "string", "pattern": "^a"}}}}}),
     "response_format.json_schema.schema.properties.a.pattern"),
    (dict(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}}, max_tokens=3),
     "max_tokens"),
    (dict(tools=[WEATHER]), "tool_choice"),  # OpenAI's default with tools is "auto"
    (dict(tools=[WEATHER], tool_choice="auto"), "tool_choice"),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
     "tool_choice.function.name"),
    (dict(tools=[WEATHER, {"type": "function", "function": {"name": "b"}}], tool_choice="required"), "tool_choice"),
    (dict(tools=[WEATHER], tool_choice="required", stop=["}"]), "stop"),
])
def test_what_cannot_be_guaranteed_is_refused_naming_the_field(oai, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="diffusiongemma", messages=[{"role": "user", "content": "x"}], **kw)
    assert e.value.body["param"] == param, e.value.body


def test_auto_refusal_says_what_to_do_instead(oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="diffusiongemma", messages=[{"role": "user", "content": "x"}],
                                    tools=[WEATHER], tool_choice="auto")
    assert "required" in e.value.body["message"] and "tool-call syntax" in e.value.body["message"]


def test_tool_choice_none_is_plain_generation(oai):
    r = oai.chat.completions.create(model="diffusiongemma", messages=[{"role": "user", "content": "hi"}],
                                    tools=[WEATHER], tool_choice="none", max_tokens=8, seed=4, extra_body=STEPS)
    plain = oai.chat.completions.create(model="diffusiongemma", messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=8, seed=4, extra_body=STEPS)
    assert r.choices[0].message.content == plain.choices[0].message.content
    assert not r.choices[0].message.tool_calls
