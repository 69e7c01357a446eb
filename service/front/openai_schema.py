"""The OpenAI-compatible request bodies (pydantic), and what this server does with OpenAI's other fields.

Every field an OpenAI client may send is in one of three places: a model below (implemented), UNSUPPORTED
(refused with a 400 naming it unless it holds its no-op value) or IGNORED (known, accepted and dropped). Any
other field is ignored too, as vLLM, SGLang and NIM do (clients follow OpenAI's evolving API): `parse` returns
the names it dropped, and the front counts them by name. docs/api.md lists them all.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from service.errors import InvalidArgument

# field -> (its no-op values, why it is refused otherwise)
UNSUPPORTED: dict[str, tuple[tuple, str]] = {
    "top_p": ((None, 1), "no nucleus sampling: its sort over the vocabulary costs a step about 3.5x the sampler "
                         "(docs/benchmarks.md); use top_k"),
    "best_of": ((None, 1), "not supported; use n"),
    "presence_penalty": ((None, 0), "not supported by the diffusion sampler"),
    "frequency_penalty": ((None, 0), "not supported by the diffusion sampler"),
    "logit_bias": ((None, {}), "not supported by the diffusion sampler"),
    "tools": ((None, []), "tool calling is on /v1/chat/completions"),
    "tool_choice": ((None, "none"), "tool calling is on /v1/chat/completions"),
    "functions": ((None, []), "OpenAI's deprecated name: use tools and tool_choice"),
    "function_call": ((None, "none"), "OpenAI's deprecated name: use tools and tool_choice"),
    "modalities": ((None, ["text"]), "only text is supported"),
    "audio": ((None,), "only text is supported"),
    "prediction": ((None,), "not supported"),
    "reasoning_effort": ((None,), "not supported"),
    "web_search_options": ((None,), "not supported"),
}
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier",
                     "prompt_cache_key"})
MAX_PROMPTS = 64  # prompts in one /v1/completions request (a list); each runs as its own job
DEFAULT_GAP_TOKENS = 16
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions `logprobs`: OpenAI's range
MAX_TOP_LOGPROBS = 20  # /v1/chat/completions `top_logprobs`: OpenAI's range (the engine's MAX_LOGPROBS)  # OpenAI's default max_tokens, the gap's length when `suffix` is given without it


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False  # a last chunk with the usage; every chunk before it carries "usage": null
    continuous_usage_stats: bool = False  # vLLM's: the usage so far on every chunk


class _Generation(_Body):
    """Fields of both generation routes: OpenAI's, and the proto's diffusion settings as extensions."""

    model: str | None = None
    n: int = 1
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens; wins when both are given
    stop: str | list[str] | None = None  # up to 4 stop sequences ("" and [] mean none, as in OpenAI's API)
    stop_token_ids: list[int] | None = None  # vLLM's: ids that end a choice
    ignore_eos: bool = False  # vLLM's: generate up to the cap whatever EOS the model writes
    # extensions, named as in diffusiongemma.v1
    max_denoising_steps: int | None = None
    entropy_bound: float | None = None
    t_min: float | None = None
    t_max: float | None = None
    stability_threshold: int | None = None
    confidence_threshold: float | None = None
    temperature: float | None = None  # scales the schedule (0 to 2); 0 is greedy (docs/api.md)
    top_k: int | None = None  # vLLM's: candidates among the k likeliest tokens; 0 or -1 (vLLM's "off") mean off
    sampler: Literal["reference", "fast"] | None = None
    return_drafts: bool = False
    response_format: Any = None  # text, or json_schema (structured output); checked by openai_structured

    def diffusion_params(self) -> dict[str, Any]:
        top_k = 0 if self.top_k == -1 else self.top_k
        return {**{k: getattr(self, k) for k in ("max_denoising_steps", "entropy_bound", "t_min", "t_max",
                                                 "stability_threshold", "confidence_threshold", "temperature")},
                "top_k": top_k}

    def length(self) -> tuple[int | None, str]:
        """The requested output length and the field it came from."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def stops(self) -> list[str]:
        """The stop sequences, OpenAI's no-op values ("" and []) as none."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        return [] if stop == [""] else stop

    def checked_stream_options(self) -> StreamOptions:
        """stream_options, refused without stream (as OpenAI does); the defaults when unset."""
        if self.stream_options is not None and not self.stream:
            raise InvalidArgument("stream_options", "only allowed with stream: true")
        return self.stream_options or StreamOptions()


class CompletionRequest(_Generation):
    prompt: Any  # one prompt or a list of them (checked by prompts_of: a union would blur the errors)
    suffix: str | None = None
    logprobs: bool | int | None = None  # alternatives per token, 0 to 5 (false and null: off)
    echo: bool = False  # the prompt before the completion, and with logprobs the prompt's scored log-probs
    score_samples: int | None = None  # extension: the estimator's samples per canvas for echo's log-probs

    def logprob_count(self) -> int | None:
        """Alternatives per token with each token's log-prob, or None (off)."""
        if self.logprobs is None or self.logprobs is False:
            return None
        if self.logprobs is True or not 0 <= self.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise InvalidArgument("logprobs", f"must be an integer in [0, {MAX_COMPLETION_LOGPROBS}] or null, "
                                              f"got {self.logprobs!r}")
        return self.logprobs


class ChatMessage(_Body):
    role: str
    content: Any = None  # a string or a list of {"type": "text", "text": ...} parts
    name: str | None = None  # passed to the chat template
    tool_call_id: str | None = None  # a tool turn's answer to this call (passed to the chat template)
    tool_calls: list[dict] | None = None  # an assistant turn's calls (passed to the chat template)


class ChatRequest(_Generation):
    messages: list[ChatMessage]
    tools: Any = None  # checked by openai_structured.tool_ask
    tool_choice: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None  # alternatives per token, 0 to 20, with logprobs: true

    def logprob_count(self) -> int | None:
        """Alternatives per token with each token's log-prob, or None (off)."""
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidArgument("top_logprobs", "requires logprobs: true")
        if not self.logprobs:
            return None
        n = self.top_logprobs or 0
        if not 0 <= n <= MAX_TOP_LOGPROBS:
            raise InvalidArgument("top_logprobs", f"must be an integer in [0, {MAX_TOP_LOGPROBS}], got {n}")
        return n


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # a prompt's BOS (vLLM's field)


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


# a union member's name in pydantic's error path (stop: str | list[str] fails at "stop.str" otherwise)
_TYPE_TAGS = {"str", "int", "float", "bool"}


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, str) and (part in _TYPE_TAGS or part.startswith(("list[", "dict["))):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse(model: type[BaseModel], body: bytes) -> tuple[Any, list[str]]:
    """The body as `model`, and the names of the top-level fields it ignored; a bad body raises
    InvalidArgument naming the field."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgument("body", f"not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise InvalidArgument("body", "must be a JSON object")
    ignored = []
    for name in list(data):
        if name in UNSUPPORTED and name not in model.model_fields:
            no_ops, why = UNSUPPORTED[name]
            if data[name] not in no_ops:
                raise InvalidArgument(name, why)
            del data[name]
        elif name not in model.model_fields:
            ignored.append(name)
            del data[name]
    try:
        return model.model_validate(data), ignored
    except ValidationError as e:
        err = e.errors()[0]
        raise InvalidArgument(_path(err["loc"]) or "body", err["msg"]) from None


def _ids(p: Any) -> bool:
    return isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)


def prompts_of(prompt: Any) -> list[str | list[int]]:
    """`prompt`: a string, a list of token ids, or a list of either (several prompts, as OpenAI takes them)."""
    if isinstance(prompt, str) or _ids(prompt):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise InvalidArgument("prompt", "must be a string, a list of token ids, or a non-empty list of those")
    if len(prompt) > MAX_PROMPTS:
        raise InvalidArgument("prompt", f"{len(prompt)} prompts, over this server's limit of {MAX_PROMPTS}")
    for i, p in enumerate(prompt):
        if not (isinstance(p, str) or _ids(p)):
            raise InvalidArgument(f"prompt[{i}]", "must be a string or a non-empty list of token ids")
    return list(prompt)


ROLE_ALIASES = {"developer": "system"}


def chat_extras(messages: list[ChatMessage]) -> list[dict]:
    """Each message's fields beyond role and content (tool calls, their ids, names), for the chat template."""
    return [{k: v for k, v in (("name", m.name), ("tool_call_id", m.tool_call_id), ("tool_calls", m.tool_calls))
             if v is not None} for m in messages]


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
