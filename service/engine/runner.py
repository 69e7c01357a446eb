"""The runner seam: the scheduler's only way to the network.

A runner owns the network, its device and its KV caches. The scheduler hands it token ids to prefill
(encoder passes over prompts and committed canvases) and the live canvases of a denoising step; the
runner runs one batched decoder pass and the step's vocabulary work on its own device and returns
per-position tensors [B, L], still on that device. Backends plug in here: `TorchRunner`
(service/engine/torch_runner.py), `TensorRTLLMRunner` (unverified), picked by service/engine/registry.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import Tensor

from service.model.config import ModelConfig
from service.sampler import ops
from service.sampler.constraints import FREE
from service.sampler.scoring import ScoreRows, score_rows
from service.sampler.tiles import CanvasDraw, StepLogprobs, Vocab, sample_step


class Cache(Protocol):
    """One sequence's KV cache, owned by the runner that made it."""

    length: int  # positions written
    reused: int  # prompt positions the prefix cache served (already encoded when the cache was made)

    def nbytes(self) -> int: ...

    def release(self) -> None:
        """Give its memory back (idempotent); the scheduler calls it when the request ends."""
        ...


@dataclass(frozen=True)
class CanvasStep:
    """One live canvas of a decoder step, as the scheduler hands it to the runner (tensors on its device)."""

    canvas: Tensor  # long [L]: the noisy canvas
    soft: Tensor | None  # [L, H]: the previous step's self-conditioning input, None on a first step
    cache: Cache
    draw: CanvasDraw  # temperature, generator, sampler, token classes
    entropy_bound: Tensor | float  # float32 [1] on the device (a float costs a fill kernel per step)
    pin_ids: Tensor | None = None  # long [L]
    pin_mask: Tensor | None = None  # bool [L]
    class_masks: Tensor | None = None  # bool [C, V] (C: the checkpoint's classes and the request's own), when
    # draw.class_ids is set
    # A scoring canvas (service/engine/scoring.py): the true ids [L] whose log-probs the step returns; nothing is
    # sampled for it. score_top: alternatives per position.
    score_ids: Tensor | None = None
    score_top: int = 0


@dataclass(frozen=True)
class StepOutput:
    """A step's result per canvas position, on the runner's device."""

    canvas: Tensor  # long [B, L]: the next canvas (accepted draws kept, the rest renoised, pins applied)
    argmax: Tensor  # long [B, L]: argmax of the processed logits, pins applied
    entropy: Tensor  # float32 [B, L]
    soft: Tensor  # [B, L, H]: the next step's self-conditioning input
    # per canvas: StepLogprobs where its draw asked, ScoreRows for a scoring canvas (None: no canvas has either)
    logprobs: list[StepLogprobs | ScoreRows | None] | None = None


class Runner(Protocol):
    name: str
    pool: object | None  # the KV store, once reserve_kv made it
    config: ModelConfig
    device: torch.device
    dtype: torch.dtype
    tile_rows: int  # rows of the vocabulary tiles, at most (service/sampler/tiles.py)
    fixed_tile: bool  # every tile exactly tile_rows rows, padded (batch invariance); else min(tile_rows, B * L)

    def describe(self) -> str:
        """How this runner executes the model, for ListModels and logs (e.g. "torch float32 on cpu")."""
        ...

    def reserve_kv(self, kv_bytes: int, max_blocks: int | None = None) -> object:
        """Allocate the KV store once (the scheduler, at start): kv_bytes for every live request's cache."""
        ...

    def new_cache(self, capacity: int, prompt: list[int] | None = None) -> Cache:
        """A cache for `capacity` positions; with `prompt`, the part the prefix cache holds is reused (`reused`)."""
        ...

    def prefix_stats(self) -> dict:
        """The prefix cache's counters: lookups, hits, tokens_queried, tokens_reused, evictions, bytes."""
        ...

    def new_generator(self, seed: int) -> torch.Generator:
        """A request's generator, on the device its draws are made on."""
        ...

    def prefill(self, rows: list[Tensor], caches: list[Cache]) -> None:
        """Encoder passes: rows[i] (long [T_i]) extend caches[i]."""
        ...

    def step(self, canvases: list[CanvasStep]) -> StepOutput:
        """One batched decoder pass over the canvases and their sampling."""
        ...

    def kv_bytes_per_token(self) -> int: ...

    def step_bytes(self, canvases: int) -> int:
        """Transient bytes a step over this many canvases may hold at once (activations and one tile)."""
        ...

    def default_memory_budget(self) -> int:
        """Bytes for KV caches and step transients when the operator sets no budget."""
        ...


def denoise(vocab: Vocab, hidden: Tensor, canvases: list[CanvasStep], tile: int, vocab_size: int,
            fixed_tile: bool = True) -> StepOutput:
    """The sampler's half of a step, shared by runners: hidden [B, L, H] -> StepOutput, on hidden's device.
    tile, fixed_tile: the vocabulary tiles' rows (service/sampler/tiles.py: sample_step).

    Draws per canvas, in the reference's order: the sampling stream (inside sample_step), then renoise.
    Scoring canvases draw nothing: their rows are split off (service/sampler/scoring.py) and come back unchanged
    with their ScoreRows in `logprobs`.
    """
    if any(c.score_ids is not None for c in canvases):
        return _with_scores(vocab, hidden, canvases, tile, vocab_size, fixed_tile)
    masks, draws = class_table(canvases)
    s = sample_step(vocab, hidden, draws, tile, masks, fixed_tile)
    pin_ids, pin_mask = _stack_pins(canvases, hidden.device)
    bounds = torch.stack([_bound(c.entropy_bound, s.entropy.dtype, hidden.device) for c in canvases])  # [B, 1]
    accepted = ops.accept_mask(s.entropy, bounds, pin_mask)  # [B, L]
    kept = torch.where(accepted, s.sampled, torch.stack([c.canvas for c in canvases]))
    # one uniform canvas per generator (ops.renoise's draws, in order), then one select for the batch
    noise = torch.stack([ops.init_canvas(kept.shape[1], vocab_size, c.draw.generator, hidden.device)
                         for c in canvases])  # [B, L]
    renoised = torch.where(accepted, kept, noise)
    return StepOutput(
        canvas=ops.apply_pins(renoised, pin_ids, pin_mask),
        argmax=ops.apply_pins(s.argmax, pin_ids, pin_mask),
        entropy=s.entropy,
        soft=s.soft,
        logprobs=s.logprobs,
    )


def _with_scores(vocab: Vocab, hidden: Tensor, canvases: list[CanvasStep], tile: int, vocab_size: int,
                 fixed_tile: bool) -> StepOutput:
    """A step whose batch holds scoring canvases: the others sampled as usual, the scoring ones scored."""
    scored = [b for b, c in enumerate(canvases) if c.score_ids is not None]
    rest = [b for b, c in enumerate(canvases) if c.score_ids is None]
    rows = score_rows(vocab, hidden[scored], torch.stack([canvases[b].score_ids for b in scored]),
                      [canvases[b].score_top for b in scored], tile, fixed_tile)
    canvas = torch.stack([c.canvas for c in canvases])  # [B, L]: a scoring canvas comes back as it went
    argmax, soft = canvas.clone(), torch.zeros_like(hidden)  # [B, L], [B, L, H]
    entropy = torch.zeros(canvas.shape, dtype=torch.float32, device=hidden.device)
    logprobs: list = [None] * len(canvases)
    for b, r in zip(scored, rows):
        logprobs[b] = r
    if rest:
        out = denoise(vocab, hidden[rest], [canvases[b] for b in rest], tile, vocab_size, fixed_tile)
        index = torch.tensor(rest, device=hidden.device)
        canvas[index], argmax[index], entropy[index], soft[index] = out.canvas, out.argmax, out.entropy, out.soft
        for b, lp in zip(rest, out.logprobs or [None] * len(rest)):
            logprobs[b] = lp
    return StepOutput(canvas=canvas, argmax=argmax, entropy=entropy, soft=soft, logprobs=logprobs)


def _bound(bound: Tensor | float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A canvas's entropy bound as [1] on the device; a float through a fill kernel, never a host copy."""
    if isinstance(bound, Tensor):
        return bound.to(dtype)
    return torch.full((1,), bound, dtype=dtype, device=device)


def class_table(canvases: list[CanvasStep]) -> tuple[Tensor | None, list[CanvasDraw]]:
    """One class-mask table for the batch and the draws that index it. Canvases usually share the checkpoint's
    table; a request with its own classes (choices) brings its own, and then the tables are stacked [sum C, V]
    and each canvas's constrained class ids are offset to its table's rows."""
    tables: list[Tensor] = []
    for c in canvases:
        if c.class_masks is not None and not any(t is c.class_masks for t in tables):
            tables.append(c.class_masks)
    draws = [c.draw for c in canvases]
    if len(tables) <= 1:
        return (tables[0] if tables else None), draws
    starts, at = [], 0
    for t in tables:
        starts.append(at)
        at += t.shape[0]
    for b, c in enumerate(canvases):
        ids = c.draw.class_ids
        if c.class_masks is not None and ids is not None:
            off = starts[next(k for k, t in enumerate(tables) if t is c.class_masks)]
            draws[b] = replace(c.draw, class_ids=torch.where(ids == FREE, ids, ids + off))
    return torch.cat(tables), draws


def _stack_pins(canvases: list[CanvasStep], device: torch.device) -> tuple[Tensor | None, Tensor | None]:
    """Pins of the batch [B, L] (unpinned canvases: none), or (None, None) when no canvas has pins."""
    if all(c.pin_mask is None for c in canvases):
        return None, None
    length = canvases[0].canvas.shape[0]
    none_ids = torch.zeros(length, dtype=torch.long, device=device)
    none_mask = torch.zeros(length, dtype=torch.bool, device=device)
    ids = torch.stack([c.pin_ids if c.pin_mask is not None else none_ids for c in canvases])
    mask = torch.stack([c.pin_mask if c.pin_mask is not None else none_mask for c in canvases])
    return ids, mask
