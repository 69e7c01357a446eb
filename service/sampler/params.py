"""Generation parameters, with the reference's names and defaults, and pins."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from service.errors import CheckpointError, InvalidArgument

if TYPE_CHECKING:  # the front reads parameters without loading torch
    import torch

# The reference's defaults (transformers DiffusionGemmaGenerationConfig._get_default_generation_params).
DEFAULTS = {
    "max_new_tokens": 256,
    "max_denoising_steps": 48,
    "entropy_bound": 0.1,
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
    # Ours, not the reference's (checkpoints do not set them): the OpenAI-style sampling knobs.
    "temperature": 1.0,
    "top_k": 0,
}
# Parameters a checkpoint's generation_config.json does not set (its `temperature`, if any, is not ours).
REQUEST_ONLY = ("temperature", "top_k")

# The same names by kind (interfaces that carry them typed: Triton inputs, the gRPC front).
INT_PARAMS = tuple(k for k, v in DEFAULTS.items() if isinstance(v, int))
FLOAT_PARAMS = tuple(k for k, v in DEFAULTS.items() if isinstance(v, float))
# The diffusion parameters proper: everything but the output length.
DIFFUSION_PARAMS = tuple(k for k in DEFAULTS if k != "max_new_tokens")

SAMPLERS = ("reference", "fast")
MAX_DENOISING_STEPS = 1024
MAX_NEW_TOKENS = 1 << 16
# Temperatures: at or above MIN_T_MAX the last step's temperature (>= t_max / max_denoising_steps, about 1e-6)
# keeps the soft-capped logits / T finite in float32; past MAX_TEMPERATURE sampling is uniform anyway.
MIN_T_MAX = 1e-3
MAX_TEMPERATURE = 100.0
# Entropies in nats: a canvas's summed entropy is at most canvas_length * ln(vocab) (about 3,200 at the real
# shape), so larger bounds mean "everything"; the cap keeps the value a float32.
MAX_ENTROPY = 1e6
# `temperature` scales the schedule by at most this (OpenAI's range is [0, 2]).
MAX_TEMPERATURE_SCALE = 2.0
# top_k past the vocabulary keeps every id (as 0 does); the cap keeps it an int32.
MAX_TOP_K = 1 << 30


def _number(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise InvalidArgument(name, f"must be a finite number, got {v!r}")
    return float(v)


def _integer(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidArgument(name, f"must be an integer, got {v!r}")
    return v


def _in(name: str, v: float, lo: float, hi: float) -> None:
    if not lo <= v <= hi:
        raise InvalidArgument(name, f"must be in [{lo:g}, {hi:g}], got {v:g}")


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = DEFAULTS["max_new_tokens"]
    max_denoising_steps: int = DEFAULTS["max_denoising_steps"]
    entropy_bound: float = DEFAULTS["entropy_bound"]
    t_min: float = DEFAULTS["t_min"]
    t_max: float = DEFAULTS["t_max"]
    stability_threshold: int = DEFAULTS["stability_threshold"]
    # 0 disables early stopping (the reference refuses 0; we accept it).
    confidence_threshold: float = DEFAULTS["confidence_threshold"]
    # "fast" (the serving default): one uniform per position (inverse CDF): the reference's distribution,
    # other ids, far less random-number work. "reference": transformers' random stream, ids equal to its
    # generate's for a seed on a CPU (opt-in; the parity tests use it).
    sampler: str = "fast"
    # Scales the schedule: steps run at T(n) of (temperature * t_min, temperature * t_max); 1 is the schedule
    # as given. 0 is greedy: every candidate is the argmax (no draws), entropies still at the unscaled
    # schedule's T(n) (so acceptance is unchanged), and the noise stream is seed 0's whatever the seed.
    temperature: float = DEFAULTS["temperature"]
    # Candidates drawn from the top_k most likely ids only (entropies and self-conditioning see all); 0 is off.
    top_k: int = DEFAULTS["top_k"]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def schedule(self) -> tuple[float, float]:
        """(t_min, t_max) the steps run at: scaled by temperature, unscaled when greedy."""
        if self.greedy or self.temperature == 1:
            return self.t_min, self.t_max
        return self.t_min * self.temperature, self.t_max * self.temperature

    def validate(self) -> "GenerationParams":
        """Every value within its documented range (docs/api.md, "Parameters"), the field named otherwise. No
        value makes a step cost more than its shape: a request's cost is its steps times the step's."""
        _in("max_new_tokens", _integer("max_new_tokens", self.max_new_tokens), 1, MAX_NEW_TOKENS)
        steps = _integer("max_denoising_steps", self.max_denoising_steps)
        _in("max_denoising_steps", steps, 1, MAX_DENOISING_STEPS)
        _in("entropy_bound", _number("entropy_bound", self.entropy_bound), 0, MAX_ENTROPY)
        _in("t_min", _number("t_min", self.t_min), 0, MAX_TEMPERATURE)
        _in("t_max", _number("t_max", self.t_max), MIN_T_MAX, MAX_TEMPERATURE)
        if self.t_max < self.t_min:
            raise InvalidArgument("t_max", f"must be >= t_min ({self.t_min:g}), got {self.t_max:g}")
        _in("temperature", _number("temperature", self.temperature), 0, MAX_TEMPERATURE_SCALE)
        hottest = self.schedule()[1]  # the scaled schedule stays in t_max's range
        if not MIN_T_MAX <= hottest <= MAX_TEMPERATURE:
            raise InvalidArgument("temperature", f"scales t_max ({self.t_max:g}) to {hottest:g}, outside "
                                  f"[{MIN_T_MAX:g}, {MAX_TEMPERATURE:g}]")
        _in("top_k", _integer("top_k", self.top_k), 0, MAX_TOP_K)
        # a canvas runs at most max_denoising_steps steps: a longer stability window could never be met
        _in("stability_threshold", _integer("stability_threshold", self.stability_threshold), 0, steps)
        _in("confidence_threshold", _number("confidence_threshold", self.confidence_threshold), 0, MAX_ENTROPY)
        if self.sampler not in SAMPLERS:
            raise InvalidArgument("sampler", f"must be one of {SAMPLERS}, got {self.sampler!r}")
        return self


def params_from_generation_config(gen: dict) -> GenerationParams:
    """A checkpoint's generation_config.json values over the reference's defaults, as its generate does."""
    values = {k: gen[k] for k in DEFAULTS
              if k != "entropy_bound" and k not in REQUEST_ONLY and gen.get(k) is not None}
    sampler_config = gen.get("sampler_config")
    if isinstance(sampler_config, dict) and sampler_config.get("entropy_bound") is not None:
        values["entropy_bound"] = sampler_config["entropy_bound"]
    try:
        return GenerationParams(**values).validate()
    except InvalidArgument as e:
        raise CheckpointError(f"generation_config.json: {e.field}: {e.detail}") from None


def generation_config_entries(gen: dict, settings: dict) -> dict:
    """`gen` (a generation_config.json) with sampler `settings` stored where the reference reads them:
    the entropy bound under sampler_config, the rest at the top level."""
    out = dict(gen)
    for k, v in settings.items():
        if k == "entropy_bound":
            out["sampler_config"] = {**(out.get("sampler_config") or {}), "entropy_bound": v}
        elif k in DEFAULTS and k not in REQUEST_ONLY:
            out[k] = v
        else:
            raise InvalidArgument(k, "not a generation parameter")
    return out


def request_params(defaults: GenerationParams, given: Mapping[str, object]) -> GenerationParams:
    """A request's parameters: the values it `given` over the model's `defaults` (unvalidated).

    `temperature` scales the model's own schedule: a request that sets t_min or t_max gets its schedule as
    given, so a temperature in (0, 2] then scales by 1 (it is still range-checked); 0 is greedy either way.
    """
    values = dict(given)
    t = values.get("temperature")
    if t is not None and ("t_min" in values or "t_max" in values):
        _in("temperature", _number("temperature", t), 0, MAX_TEMPERATURE_SCALE)
        values["temperature"] = 0.0 if t == 0 else 1.0
    return replace(defaults, **values)


@dataclass(frozen=True)
class Pins:
    """Tokens fixed in the first canvas: `ids[i]` is kept wherever `mask[i]` is true.

    Both have length <= canvas_length; positions past their end are free. They are the primitive
    behind infilling (suffix pinned at the end), editing and templates.
    """

    ids: torch.Tensor  # [P] long
    mask: torch.Tensor  # [P] bool

    @staticmethod
    def from_lists(ids: list[int], mask: list[bool] | None = None) -> "Pins":
        import torch

        m = [True] * len(ids) if mask is None else list(mask)
        if len(m) != len(ids):
            raise InvalidArgument("pin_mask", f"has {len(m)} entries but pin_ids has {len(ids)}")
        return Pins(torch.tensor(ids, dtype=torch.long), torch.tensor(m, dtype=torch.bool))

    def validate(self, canvas_length: int, vocab_size: int) -> "Pins":
        if self.ids.ndim != 1 or self.mask.shape != self.ids.shape:
            raise InvalidArgument("pin_ids", "pin_ids and pin_mask must be 1-D and of equal length")
        if self.ids.numel() > canvas_length:
            raise InvalidArgument("pin_ids", f"has {self.ids.numel()} positions; the canvas holds {canvas_length}")
        pinned = self.ids[self.mask]
        if pinned.numel() and (int(pinned.min()) < 0 or int(pinned.max()) >= vocab_size):
            raise InvalidArgument("pin_ids", f"pinned ids must be in [0, {vocab_size})")
        return self

    def full(self, canvas_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded to the canvas: ids [L], mask [L]."""
        import torch

        ids = torch.zeros(canvas_length, dtype=torch.long)
        mask = torch.zeros(canvas_length, dtype=torch.bool)
        ids[: self.ids.numel()] = torch.where(self.mask, self.ids, 0)
        mask[: self.mask.numel()] = self.mask
        return ids, mask
