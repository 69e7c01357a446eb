"""The in-process engine API: the request type, the events a request yields, and the Engine protocol."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol, Union

from service.errors import InvalidArgument
from service.logprobs import Logprobs  # noqa: F401 (part of this API)
from service.model.config import ModelConfig
from service.sampler.constraints import FREE, NUM_CLASSES
from service.sampler.params import GenerationParams, Pins


MAX_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's top_logprobs range)


@dataclass
class Request:
    """One generation request: prompt ids, optional pins and constraints, parameters and seed."""

    prompt_ids: list[int]
    params: GenerationParams = field(default_factory=GenerationParams)
    seed: int = 0
    pins: Pins | None = None
    return_drafts: bool = False
    request_id: str = ""
    # A token class id (service.sampler.constraints) per position of the first canvas, from position 0;
    # at most canvas_length. Pinned positions keep their pin.
    constraints: list[int] | None = None
    # Generate up to max_new_tokens whatever EOS the model writes: no EOS ends it or pads after it.
    ignore_eos: bool = False
    # The request's own token classes: class NUM_CLASSES + j allows the ids of choices[j] (an enum's tokens at
    # one position). At most canvas_length sets.
    choices: list[list[int]] | None = None
    # Log-probabilities of the committed ids and of the `logprobs` likeliest alternatives at each position's
    # commit step (0 to MAX_LOGPROBS); None: off.
    logprobs: int | None = None

    def validate(self, cfg: ModelConfig) -> "Request":
        if not isinstance(self.prompt_ids, (list, tuple)) or len(self.prompt_ids) == 0:
            raise InvalidArgument("prompt_ids", "the prompt is empty")
        for i in self.prompt_ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < cfg.vocab_size:
                raise InvalidArgument("prompt_ids", f"id {i!r} is outside the vocabulary [0, {cfg.vocab_size})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise InvalidArgument("seed", f"must be an integer in [0, 2^63), got {self.seed!r}")
        if not isinstance(self.params, GenerationParams):
            raise InvalidArgument("params", "must be a GenerationParams")
        self.params.validate()
        if self.pins is not None:
            self.pins.validate(cfg.canvas_length, cfg.vocab_size)
        if self.choices is not None:
            self._validate_choices(cfg.canvas_length, cfg.vocab_size)
        if self.constraints is not None:
            self._validate_constraints(cfg.canvas_length)
        lp = self.logprobs
        if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= MAX_LOGPROBS):
            raise InvalidArgument("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}] (alternatives per token), "
                                              f"got {lp!r}")
        return self

    def _validate_choices(self, canvas_length: int, vocab_size: int) -> None:
        if not isinstance(self.choices, (list, tuple)) or len(self.choices) > canvas_length:
            raise InvalidArgument("choices", f"must be a list of at most {canvas_length} id sets")
        for j, ids in enumerate(self.choices):
            if not isinstance(ids, (list, tuple)) or not ids:
                raise InvalidArgument("choices", f"set {j} is empty")
            for i in ids:
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
                    raise InvalidArgument("choices", f"set {j}: id {i!r} is outside the vocabulary [0, {vocab_size})")

    def _validate_constraints(self, canvas_length: int) -> None:
        if not isinstance(self.constraints, (list, tuple)):
            raise InvalidArgument("constraints", "must be a list of class ids")
        n = len(self.constraints)
        if n > canvas_length:
            raise InvalidArgument("constraints", f"has {n} positions; the canvas holds {canvas_length}")
        top = NUM_CLASSES + len(self.choices or ())
        for c in self.constraints:
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < top:
                raise InvalidArgument("constraints", f"class id {c!r} is outside [0, {top})")

    @property
    def constrained(self) -> bool:
        """Whether any position has a class other than FREE (0)."""
        return any(c != FREE for c in self.constraints or ())


@dataclass(frozen=True)
class DraftEvent:
    """The argmax canvas after one denoising step (only when the request asked for drafts)."""

    canvas_index: int
    step: int  # 1-based count of steps run on this canvas
    tokens: list[int]


@dataclass(frozen=True)
class CanvasEvent:
    """A committed canvas: final tokens of that block (pad after EOS)."""

    canvas_index: int
    tokens: list[int]
    steps: int
    started_ns: int = 0  # wall clock (time.time_ns) when denoising began, after the prefix was encoded
    committed_ns: int = 0  # wall clock when it was committed
    logprobs: Logprobs | None = None  # one entry per token, when the request asked


@dataclass(frozen=True)
class Stats:
    prompt_tokens: int
    generated_tokens: int  # excluding pad
    decoder_passes: int
    steps_per_canvas: list[int]
    shared_decoder_passes: int = 0  # passes whose batch held another request too
    cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache (not encoded again)

    @property
    def tokens_per_forward(self) -> float:
        return self.generated_tokens / self.decoder_passes if self.decoder_passes else 0.0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "decoder_passes": self.decoder_passes,
            "steps_per_canvas": list(self.steps_per_canvas),
            "tokens_per_forward": self.tokens_per_forward,
            "shared_decoder_passes": self.shared_decoder_passes,
            "cached_prompt_tokens": self.cached_prompt_tokens,
        }


@dataclass(frozen=True)
class FinalEvent:
    token_ids: list[int]  # every generated canvas, pad included, as the reference returns them
    finish_reason: str  # "eos" or "length"
    stats: Stats
    logprobs: Logprobs | None = None  # one entry per token id, when the request asked


Event = Union[DraftEvent, CanvasEvent, FinalEvent]


class Engine(Protocol):
    """What the upper layers (CLI, Triton adapter, front) depend on."""

    config: ModelConfig

    def generate(self, request: Request) -> Iterator[Event]:
        """Validate and run one request; yields drafts (if asked), canvases, then one FinalEvent."""
        ...
