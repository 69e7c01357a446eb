"""The OpenAI-compatible request bodies (pydantic), and what this server does with OpenAI's other fields.

Every field an OpenAI client may send is in one of three places: a model below (implemented), UNSUPPORTED
(refused with a 400 naming it unless it holds its no-op value) or IGNORED (accepted and dropped). Anything
else is refused as an unknown field. docs/api.md lists them all.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from service.errors import InvalidArgument

# field -> (its no-op values, why it is refused otherwise)
UNSUPPORTED: dict[str, tuple[tuple, str]] = {
    "temperature": ((None,), "the diffusion sampler's temperatures are t_min and t_max (extension fields)"),
    "top_p": ((None, 1), "not supported by the diffusion sampler"),
    "logprobs": ((None, False), "log probabilities are not returned"),
    "top_logprobs": ((None, 0), "log probabilities are not returned"),
    "echo": ((None, False), "not supported"),
    "best_of": ((None, 1), "not supported; use n"),
    "stop": ((None, "", []), "stop sequences are not supported"),
    "presence_penalty": ((None, 0), "not supported by the diffusion sampler"),
    "frequency_penalty": ((None, 0), "not supported by the diffusion sampler"),
    "logit_bias": ((None, {}), "not supported by the diffusion sampler"),
    "tools": ((None, []), "tool calling is not supported"),
    "tool_choice": ((None, "none"), "tool calling is not supported"),
    "functions": ((None, []), "function calling is not supported"),
    "function_call": ((None, "none"), "function calling is not supported"),
    "response_format": ((None, {"type": "text"}), "structured output is the gRPC Template RPC"),
    "modalities": ((None, ["text"]), "only text is supported"),
    "audio": ((None,), "only text is supported"),
    "prediction": ((None,), "not supported"),
    "reasoning_effort": ((None,), "not supported"),
    "web_search_options": ((None,), "not supported"),
}
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier",
                     "prompt_cache_key"})
DEFAULT_GAP_TOKENS = 16  # OpenAI's default max_tokens, the gap's length when `suffix` is given without it


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body):
    """Fields of both generation routes: OpenAI's, and the proto's diffusion settings as extensions."""

    model: str | None = None
    n: int = 1
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    # extensions, named as in diffusiongemma.v1
    max_denoising_steps: int | None = None
    entropy_bound: float | None = None
    t_min: float | None = None
    t_max: float | None = None
    stability_threshold: int | None = None
    confidence_threshold: float | None = None
    sampler: Literal["reference", "fast"] | None = None
    return_drafts: bool = False

    def diffusion_params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("max_denoising_steps", "entropy_bound", "t_min", "t_max",
                                              "stability_threshold", "confidence_threshold")}


class CompletionRequest(_Generation):
    prompt: Any  # a string or a list of token ids (checked by prompt_of: a union would blur the errors)
    suffix: str | None = None


class ChatMessage(_Body):
    role: str
    content: Any = None  # a string or a list of {"type": "text", "text": ...} parts
    name: str | None = None  # accepted and ignored


class ChatRequest(_Generation):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse(model: type[BaseModel], body: bytes):
    """The body as `model`; a bad one raises InvalidArgument naming the field."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgument("body", f"not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise InvalidArgument("body", "must be a JSON object")
    for name in list(data):
        if name in IGNORED:
            del data[name]
        elif name in UNSUPPORTED and name not in model.model_fields:
            no_ops, why = UNSUPPORTED[name]
            if data[name] not in no_ops:
                raise InvalidArgument(name, why)
            del data[name]
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        raise InvalidArgument(_path(err["loc"]) or "body", message) from None


def prompt_of(prompt: Any) -> str | list[int]:
    """`prompt`: a string or a list of token ids (a list holding one of those is accepted too)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise InvalidArgument("prompt", "must be a string or a list of token ids (one prompt per request)")


ROLE_ALIASES = {"developer": "system"}


def chat_of(messages: list[ChatMessage], name: str = "messages") -> list[tuple[str, str]]:
    """(role, text) turns; content is a string or a list of text parts."""
    turns = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidArgument(f"{name}[{i}].content[{j}]", "only text parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise InvalidArgument(f"{name}[{i}].content", "must be a string or a list of text parts")
        turns.append((ROLE_ALIASES.get(m.role, m.role), content))
    return turns
