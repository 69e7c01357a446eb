"""Calibration data and the calibration forward loop: the denoising loop itself, not plain text.

Each prompt runs the reference model's `generate`: an encoder pass over the prompt, then decoder passes over a
canvas that starts as noise and is denoised step by step under the temperature schedule (t_max -> t_min), with
self-conditioning on the previous step's logits from the second step on. Early stopping is off, so every prompt
sees every noise level. With `canvases` > 1 the committed canvas also runs through the encoder.

A calibration file (`dgemma build --calibration FILE`) holds one prompt per line (blank lines skipped), or, when
its name ends in `.jsonl`, one JSON object per line with a "prompt" string.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import torch

from service.errors import InvalidArgument

BUILTIN = "builtin"


@dataclass(frozen=True)
class PromptSet:
    prompts: tuple[str, ...]
    source: str  # "builtin" or the file's name

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(list(self.prompts), ensure_ascii=False).encode()).hexdigest()

    def record(self) -> dict:
        """The manifest's `calibration` entry."""
        return {"sha256": self.sha256, "prompts": len(self.prompts), "source": self.source}


def _packaged(name: str) -> list[str]:
    text = resources.files("engine_build").joinpath("data", name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def builtin_prompts() -> PromptSet:
    return PromptSet(tuple(_packaged("calibration_prompts.txt")), BUILTIN)


def heldout_prompts() -> tuple[str, ...]:
    """Verification prompts: none of them is a calibration prompt (a test checks)."""
    return tuple(_packaged("heldout_prompts.txt"))


def read_prompt_file(path: str | Path, field: str = "--calibration") -> PromptSet:
    """Prompts from a user file; InvalidArgument naming `field` when it is missing, unreadable or empty."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidArgument(field, f"calibration file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgument(field, f"cannot read calibration file {p}: {e}") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if p.name.endswith(".jsonl"):
        prompts = []
        for n, line in lines:
            try:
                obj = json.loads(line)
            except ValueError:
                raise InvalidArgument(field, f"{p.name} line {n} is not JSON") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
                raise InvalidArgument(field, f'{p.name} line {n}: expected {{"prompt": "<non-empty text>"}}')
            prompts.append(obj["prompt"])
    else:
        prompts = [line for _, line in lines]
    if not prompts:
        raise InvalidArgument(field, f"calibration file {p} holds no prompts")
    return PromptSet(tuple(prompts), p.name)


@dataclass(frozen=True)
class CalibrationSettings:
    steps: int = 8  # denoising steps per canvas: noise levels from t_max down to t_min
    canvases: int = 1  # canvases per prompt

    def generate_kwargs(self, canvas_length: int, eos_ids: list[int], pad_id: int) -> dict:
        return dict(max_new_tokens=canvas_length * self.canvases, max_denoising_steps=self.steps,
                    eos_token_id=eos_ids, pad_token_id=pad_id,
                    confidence_threshold=1e-9)  # no early stop (the reference rejects 0)


def progress(items, label: str):
    """A progress bar on stderr when it is a terminal; the plain iterable otherwise."""
    from tqdm import tqdm

    return tqdm(items, desc=label, unit="prompt", disable=not sys.stderr.isatty())


def forward_loop(prompt_ids: list[list[int]], settings: CalibrationSettings, canvas_length: int,
                 eos_ids: list[int], pad_id: int, device: str = "cpu") -> Callable[[torch.nn.Module], None]:
    """The loop ModelOpt calls to calibrate: the reference denoising loop over every prompt, seeded per prompt,
    with the prompts on `device` (the model's: "cuda" is UNVERIFIED, no GPU has run it)."""
    kwargs = settings.generate_kwargs(canvas_length, eos_ids, pad_id)

    def run(model: torch.nn.Module) -> None:
        for i, ids in enumerate(progress(prompt_ids, "calibrating")):
            torch.manual_seed(i)  # seeds the CUDA generators too
            model.generate(torch.tensor([ids], device=device), **kwargs)

    return run
