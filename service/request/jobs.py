"""A public request, validated and reduced to what the model runs: a `Job` of one or more variations.

Protobuf stays at the edge: the servicer turns messages into these plain values and back.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
import uuid
from dataclasses import dataclass, field

from service.errors import InvalidArgument
from service.logprobs import MAX_SCORE_SAMPLES
from service.request.catalog import ServedModel
from service.request.stopping import StopSpec, stop_spec
from service.request.triton_client import Tensor
from service.sampler.params import DIFFUSION_PARAMS, INT_PARAMS
from service.text.token_classes import choice_ids_of

MAX_VARIATIONS = 16
MAX_SCORE_ALTERNATIVES = 20  # the engine's MAX_LOGPROBS
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
ROLES = {"system": "system", "user": "user", "model": "model", "assistant": "model", "tool": "tool"}
SAMPLERS = {0: None, 1: "reference", 2: "fast"}  # proto enum Sampler -> the backend's name
PARAM_FIELDS = DIFFUSION_PARAMS  # DiffusionParameters' numeric fields, named as the backend's inputs


@dataclass(frozen=True)
class Paths:
    """Where a front's request keeps each option, for the field paths in error messages."""

    params: str = "options.parameters."  # prefix of the diffusion parameters
    seed: str = "options.seed"
    num_variations: str = "options.num_variations"


GRPC_PATHS = Paths()
OPENAI_PATHS = Paths(params="", seed="seed", num_variations="n")  # extension fields at the body's top level


@dataclass
class Options:
    """Diffusion parameters that were set (others take the model's defaults), seed and variations."""

    params: dict[str, int | float | str] = field(default_factory=dict)
    seed: int = 0
    num_variations: int = 1


@dataclass
class Job:
    request_id: str
    prompt_ids: list[int]
    options: Options
    max_new_tokens: int | None = None
    return_drafts: bool = False
    pin_ids: list[int] | None = None
    pin_mask: list[bool] | None = None
    constraint_ids: list[int] | None = None
    choices: list[list[int]] | None = None  # the request's own token classes (constraint ids from NUM_CLASSES)
    # a hard cap on returned tokens and stop conditions, applied by Dispatcher.run (None: the engine's output
    # as it is, whole canvases)
    stopping: StopSpec | None = None
    ignore_eos: bool = False  # the engine generates up to max_new_tokens whatever EOS it writes
    logprobs: int | None = None  # alternatives per token (0 to 20) with each token's log-prob; None: off
    # a scoring job (docs/api.md, "Score"): the continuation scored after prompt_ids, and its samples per canvas
    score_ids: list[int] | None = None
    score_samples: int | None = None
    # the backend's input names -> this request's field paths, for errors the backend finds
    field_names: dict[str, str] = field(default_factory=dict)

    def seed(self, variation: int) -> int:
        return self.options.seed + variation

    def inputs(self, variation: int) -> dict[str, Tensor]:
        """The model's inputs (docs/api.md) for one variation."""
        t: dict[str, Tensor] = {
            "input_ids": Tensor("INT32", self.prompt_ids),
            "seed": Tensor("UINT64", [self.seed(variation)]),
            "request_id": Tensor("BYTES", [f"{self.request_id}/{variation}"]),
        }
        if self.score_ids is not None:
            t["score_ids"] = Tensor("INT32", self.score_ids)
            if self.score_samples is not None:
                t["score_samples"] = Tensor("INT32", [self.score_samples])
        if self.max_new_tokens is not None:
            t["max_new_tokens"] = Tensor("INT32", [self.max_new_tokens])
        for name, v in self.options.params.items():
            kind = "BYTES" if name == "sampler" else "INT32" if name in INT_PARAMS else "FP32"
            t[name] = Tensor(kind, [v])
        if self.ignore_eos:
            t["ignore_eos"] = Tensor("BOOL", [True])
        if self.logprobs is not None:
            t["logprobs"] = Tensor("INT32", [self.logprobs])
        if self.return_drafts:
            t["return_drafts"] = Tensor("BOOL", [True])
        if self.pin_ids is not None:
            t["pin_ids"] = Tensor("INT32", self.pin_ids)
            t["pin_mask"] = Tensor("BOOL", self.pin_mask if self.pin_mask is not None else [True] * len(self.pin_ids))
        if self.constraint_ids is not None:
            t["constraint_ids"] = Tensor("INT32", self.constraint_ids)
        if self.choices:
            t["choice_ids"] = Tensor("INT32", choice_ids_of(self.choices))
        return t


def score_job(request_id: str, context: list[int], continuation: list[int], samples: int | None, seed: int | None,
              top: int, fields: dict[str, str]) -> Job:
    """A scoring job, its numbers checked under the request's field names (`fields`: the backend's input names ->
    the request's: input_ids, score_ids, score_samples, seed, logprobs)."""
    if samples is not None and not 1 <= samples <= MAX_SCORE_SAMPLES:
        raise InvalidArgument(fields["score_samples"], f"must be in [1, {MAX_SCORE_SAMPLES}], got {samples}")
    if not 0 <= top <= MAX_SCORE_ALTERNATIVES:
        raise InvalidArgument(fields["logprobs"], f"must be in [0, {MAX_SCORE_ALTERNATIVES}], got {top}")
    if seed is not None and not 0 <= seed < 2**63:
        raise InvalidArgument(fields["seed"], "must be in [0, 2^63)")
    names = {**fields, "prompt_ids": fields["input_ids"], "text_input": fields["input_ids"]}
    return Job(request_id=request_id, prompt_ids=context, options=Options(seed=seed or 0), logprobs=top,
               score_ids=continuation, score_samples=samples, field_names=names)


def request_id_of(given: str) -> str:
    if not given:
        return uuid.uuid4().hex
    if not _REQUEST_ID.fullmatch(given):  # not match: its `$` accepts a trailing newline
        raise InvalidArgument("request_id", "must be 1 to 128 printable ASCII characters without spaces")
    return given


def options_of(params: dict[str, object], sampler: int | str | None, seed: int | None, num_variations: int,
               paths: Paths = GRPC_PATHS) -> Options:
    """Validate the options a client can set; the backend validates parameter values and names them.
    `sampler` is the proto's enum value or the backend's name (None: the default)."""
    if not 0 <= num_variations <= MAX_VARIATIONS:
        raise InvalidArgument(paths.num_variations, f"must be in [1, {MAX_VARIATIONS}], got {num_variations}")
    n = num_variations or 1
    seed = seed or 0
    if not 0 <= seed or seed + n > 2**63:
        raise InvalidArgument(paths.seed, f"must be >= 0, and seed + {paths.num_variations} below 2^63")
    if isinstance(sampler, str) or sampler is None:
        names = {v: k for k, v in SAMPLERS.items()}
        if sampler not in names:
            raise InvalidArgument(paths.params + "sampler", f"must be 'reference' or 'fast', got {sampler!r}")
        sampler = names[sampler]
    if sampler not in SAMPLERS:
        raise InvalidArgument(paths.params + "sampler", f"unknown sampler {sampler}")
    values = {k: v for k, v in params.items() if v is not None}
    if SAMPLERS[sampler] is not None:
        values["sampler"] = SAMPLERS[sampler]
    return Options(values, seed, n)


def field_names(prompt_field: str, length_field: str = "max_new_tokens", paths: Paths = GRPC_PATHS
                ) -> dict[str, str]:
    """The backend's input names as this request's field paths (for errors only the backend can find), and
    `num_variations` for the front's own limit."""
    names = {name: paths.params + name for name in (*PARAM_FIELDS, "sampler")}
    names.update(seed=paths.seed, input_ids=prompt_field, text_input=prompt_field, prompt_ids=prompt_field,
                 max_new_tokens=length_field, num_variations=paths.num_variations)
    return names


def prompt_ids(model: ServedModel, text: str | None, chat: list[tuple[str, str]] | None,
               token_ids: list[int] | None) -> tuple[list[int], str]:
    """The prompt's ids and the field it came from."""
    if text is not None:
        return text_ids(model, text, "text"), "text"
    if chat is not None:
        return chat_ids(model, chat, "chat.messages"), "chat"
    if token_ids is not None:
        return checked_ids(model, token_ids, "token_ids.ids"), "token_ids.ids"
    raise InvalidArgument("prompt", "give one of text, chat or token_ids")


def text_ids(model: ServedModel, text: str, name: str) -> list[int]:
    """A plain-text prompt's ids (BOS prepended)."""
    if not text:
        raise InvalidArgument(name, "the prompt is empty")
    return tokenizer_of(model, name).encode(text)


def checked_ids(model: ServedModel, token_ids: list[int], name: str) -> list[int]:
    """Raw prompt ids, each checked against the vocabulary."""
    if not token_ids:
        raise InvalidArgument(name, "the prompt is empty")
    vocab = model.config.vocab_size
    for i, t in enumerate(token_ids):
        if not 0 <= t < vocab:
            raise InvalidArgument(f"{name}[{i}]", f"id {t} is outside the vocabulary [0, {vocab})")
    return list(token_ids)


def chat_ids(model: ServedModel, chat: list[tuple[str, str]], name: str, extras: list[dict] | None = None
             ) -> list[int]:
    """A conversation's ids through the chat template; `name` is the path of the messages field; `extras`: each
    message's other fields (tool calls, their ids), given to the template."""
    if not chat:
        raise InvalidArgument(name, "the conversation is empty")
    turns = []
    for i, (role, content) in enumerate(chat):
        if role not in ROLES:
            raise InvalidArgument(f"{name}[{i}].role", f"must be one of {sorted(ROLES)}, got {role!r}")
        turns.append((ROLES[role], content))
    try:
        return tokenizer_of(model, name).chat_prompt(turns, extras)
    except InvalidArgument as e:  # the chat template refused the conversation
        raise e.renamed(name) from None


def tokenizer_of(model: ServedModel, name: str):
    if model.tokenizer is None:
        raise InvalidArgument(name, "this model has no tokenizer; send token_ids")
    return model.tokenizer


def stopping_of(model: ServedModel, max_new_tokens: int | None, stop: Sequence[str] = (),
                stop_token_ids: Sequence[int] = ()) -> StopSpec:
    """A generation's cut, as both fronts ask for it: the hard cap (the model's default length when unset), stop
    sequences and stop token ids, validated against the served model."""
    return stop_spec(model.defaults.max_new_tokens if max_new_tokens is None else max_new_tokens, stop,
                     stop_token_ids, vocab_size=model.config.vocab_size, has_tokenizer=model.tokenizer is not None)
