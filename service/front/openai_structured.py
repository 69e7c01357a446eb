"""OpenAI's `response_format` and tool calling, mapped onto structured output (service/request/structured.py).

Both come down to one JSON Schema whose document the canvas holds: `response_format`'s json_schema, or the
called function's `parameters`. docs/api.md, "Structured output and tool calls", says what is supported.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from service.errors import InvalidArgument

# An object with no properties: a function that takes no arguments.
NO_ARGUMENTS = {"type": "object", "properties": {}}
AUTO_REFUSED = ("'auto' needs a tool-call syntax in the model's output to parse calls from, and this server knows "
                "none for this checkpoint's chat template; set tool_choice to 'required' (with one tool) or "
                "{\"type\": \"function\", \"function\": {\"name\": ...}}, which generate the arguments as a "
                "structured document")


@dataclass(frozen=True)
class StructuredAsk:
    """A request for one JSON document: its schema, the field that gave it (errors name paths under it) and,
    for a tool call, the function's name."""

    schema: Any
    field: str
    tool: str | None = None


def response_format_ask(response_format: Any) -> StructuredAsk | None:
    """`response_format`: None or text (plain generation), json_schema (a document), anything else a 400."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise InvalidArgument("response_format", "must be an object with a type")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        raise InvalidArgument("response_format.type", "json_object cannot be guaranteed: only a pinned skeleton "
                                                      "guarantees a parse here; give json_schema with the object's "
                                                      "schema")
    if kind != "json_schema":
        raise InvalidArgument("response_format.type", f"must be text or json_schema, got {str(kind)[:64]!r}")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or "schema" not in spec:
        raise InvalidArgument("response_format.json_schema", "must be an object with a schema")
    return StructuredAsk(spec["schema"], "response_format.json_schema.schema")


def _functions(tools: Any) -> dict[str, tuple[int, Any]]:
    """Each function's name -> (its index in tools, its parameters schema)."""
    if not isinstance(tools, list):
        raise InvalidArgument("tools", "must be a list of {type: function, function: {...}}")
    out: dict[str, tuple[int, Any]] = {}
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise InvalidArgument(f"tools[{i}]", "must be {type: function, function: {name, parameters}}")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"tools[{i}].function.name", "must be a non-empty string")
        if name in out:
            raise InvalidArgument(f"tools[{i}].function.name", f"{name[:64]!r} is given twice")
        out[name] = (i, fn.get("parameters") or NO_ARGUMENTS)
    return out


def tool_ask(tools: Any, tool_choice: Any) -> StructuredAsk | None:
    """The function a request calls: named in tool_choice, or the only tool with 'required'. 'none' (or no
    tools) is plain generation; 'auto' (OpenAI's default with tools) is refused, saying why."""
    if tools is not None and not isinstance(tools, list):
        raise InvalidArgument("tools", "must be a list of {type: function, function: {...}}")
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidArgument("tool_choice", "names a tool, but tools is empty")
        return None
    functions = _functions(tools)
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return None
    if choice == "auto":
        raise InvalidArgument("tool_choice", AUTO_REFUSED)
    if choice == "required":
        if len(functions) != 1:
            raise InvalidArgument("tool_choice", f"'required' with {len(functions)} tools: this server cannot choose "
                                                 "among them; name one ({\"type\": \"function\", \"function\": "
                                                 "{\"name\": ...}})")
        name = next(iter(functions))
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in functions:
            raise InvalidArgument("tool_choice.function.name", f"{str(name)[:64]!r} is not one of the tools")
    else:
        raise InvalidArgument("tool_choice", "must be 'none', 'auto', 'required' or "
                                             "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    i, params = functions[name]
    return StructuredAsk(params, f"tools[{i}].function.parameters", name)


def message_of(ask: StructuredAsk, document: str) -> tuple[dict, str]:
    """The assistant message holding a document, and its finish_reason."""
    if ask.tool is None:
        return {"role": "assistant", "content": document}, "stop"
    call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": ask.tool, "arguments": document}}
    return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"


def delta_of(message: dict) -> dict:
    """A whole message as one streamed delta (tool calls indexed, as OpenAI streams them)."""
    if "tool_calls" in message:
        return {"role": "assistant", "content": None,
                "tool_calls": [{"index": k, **c} for k, c in enumerate(message["tool_calls"])]}
    return dict(message)
