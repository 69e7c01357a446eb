"""response_format and tools onto one schema (service/front/openai_structured.py)."""

import pytest

from service.errors import InvalidArgument
from service.front.openai_structured import NO_ARGUMENTS, delta_of, message_of, response_format_ask, tool_ask

FN = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
G = {"type": "function", "function": {"name": "g"}}


def test_response_formats():
    assert response_format_ask(None) is None and response_format_ask({"type": "text"}) is None
    ask = response_format_ask({"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "string"}}})
    assert ask.schema == {"type": "string"} and ask.field == "response_format.json_schema.schema" and ask.tool is None


@pytest.mark.parametrize("rf, field", [
    ("json", "response_format"), ({"type": "json_object"}, "response_format.type"),
    ({"type": "regex"}, "response_format.type"), ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "n"}}, "response_format.json_schema"),
])
def test_bad_response_formats_name_the_field(rf, field):
    with pytest.raises(InvalidArgument) as e:
        response_format_ask(rf)
    assert e.value.field == field


def test_tool_choices():
    assert tool_ask(None, None) is None and tool_ask([], "none") is None and tool_ask([FN], "none") is None
    ask = tool_ask([FN, G], {"type": "function", "function": {"name": "g"}})
    assert (ask.tool, ask.schema, ask.field) == ("g", NO_ARGUMENTS, "tools[1].function.parameters")
    assert tool_ask([FN], "required").tool == "f"


@pytest.mark.parametrize("tools, choice, field", [
    ([FN], None, "tool_choice"), ([FN], "auto", "tool_choice"), ([FN, G], "required", "tool_choice"),
    ([FN], {"type": "function", "function": {"name": "h"}}, "tool_choice.function.name"),
    ([FN], "sometimes", "tool_choice"), ([], "required", "tool_choice"),
    ("f", "required", "tools"), ([{"type": "retrieval"}], "required", "tools[0]"),
    ([FN, FN], "required", "tools[1].function.name"), ([{"function": {"name": ""}}], "required", "tools[0].function.name"),
])
def test_bad_tool_choices_name_the_field(tools, choice, field):
    with pytest.raises(InvalidArgument) as e:
        tool_ask(tools, choice)
    assert e.value.field == field


def test_messages_and_deltas():
    msg, finish = message_of(tool_ask([FN], "required"), "{}")
    assert finish == "tool_calls" and msg["content"] is None and msg["tool_calls"][0]["function"] == {
        "name": "f", "arguments": "{}"}
    assert delta_of(msg)["tool_calls"][0]["index"] == 0
    msg, finish = message_of(response_format_ask({"type": "json_schema", "json_schema": {"schema": {}}}), "1")
    assert (msg, finish) == ({"role": "assistant", "content": "1"}, "stop") and delta_of(msg) == msg
