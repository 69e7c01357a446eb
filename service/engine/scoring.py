"""Scoring: a Monte Carlo estimate of log p(continuation | context) from the denoising objective.

A scoring request is a sequence kind the scheduler steps like a canvas (one decoder row per step, batched with
generation, admitted against the same budget): its context is encoded into the KV cache as a prompt is; the
continuation is laid into canvases of L positions after it (block j holds continuation[j L : (j + 1) L]; a block
is scored given the context and the clean blocks before it, which are encoded into the cache as committed
canvases are). Each block takes `samples` steps; step k (k = 0 .. K-1):

    t_k = T_LO + (1 - T_LO) (k + u_k) / K               stratified noise levels, u_k ~ U[0, 1)
    M_k = {i < n : r_ki < t_k}                          the corrupted positions, r_ki ~ U[0, 1)
    canvas_k[i] = z_ki if i in M_k or i >= n else x_i   uniform-state noise z_ki ~ U{0 .. V-1}
    f_ki = log p_theta(x_i | context, canvas_k)         one decoder pass (self-conditioning off), temperature 1

(n: the block's continuation positions; positions past them are unknown, so always noise.) The per-token
estimate is the self-normalised importance-weighted mean over the samples that corrupted position i, with
weights 1 / t_k:

    est_i = sum_k [i in M_k] f_ki / t_k  /  sum_k [i in M_k] / t_k

The last step also corrupts any position no earlier step did, so every position has an estimate. What it
estimates and its bias: docs/api.md, "Score". Draw order from the request's generator (the brute-force test
repeats it): per block, u [K]; then per step, r [L] and z [L].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from service.engine.api import MAX_LOGPROBS, FinalEvent, Logprobs, Request, Stats
from service.engine.runner import Cache, CanvasStep
from service.engine.sequence import Sequence
from service.errors import InvalidArgument
from service.logprobs import DEFAULT_SCORE_SAMPLES as DEFAULT_SAMPLES, MAX_SCORE_SAMPLES as MAX_SAMPLES
from service.model.config import ModelConfig
from service.sampler.params import MAX_NEW_TOKENS
from service.sampler.scoring import ScoreRows
from service.sampler.tiles import CanvasDraw

T_LO = 0.05  # the lowest noise level the embedded model was trained at (tools/tiny_model/objective.py)


@dataclass
class ScoreRequest:
    """Score `target_ids` after `prompt_ids` (the context); `seed` makes the estimate reproducible."""

    prompt_ids: list[int]
    target_ids: list[int]
    samples: int = DEFAULT_SAMPLES
    seed: int = 0
    top_logprobs: int = 0  # alternatives per position, 0 to MAX_LOGPROBS
    request_id: str = ""

    def validate(self, cfg: ModelConfig) -> "ScoreRequest":
        for name in ("prompt_ids", "target_ids"):
            ids = getattr(self, name)
            if not isinstance(ids, (list, tuple)) or not ids:
                raise InvalidArgument(name, "is empty")
            for i in ids:
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < cfg.vocab_size:
                    raise InvalidArgument(name, f"id {i!r} is outside the vocabulary [0, {cfg.vocab_size})")
        if len(self.target_ids) > MAX_NEW_TOKENS:
            raise InvalidArgument("target_ids", f"longer than {MAX_NEW_TOKENS} tokens")
        _int_in("samples", self.samples, 1, MAX_SAMPLES)
        _int_in("seed", self.seed, 0, 2**63 - 1)
        _int_in("top_logprobs", self.top_logprobs, 0, MAX_LOGPROBS)
        return self


def _int_in(name: str, v: object, lo: int, hi: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise InvalidArgument(name, f"must be an integer in [{lo}, {hi}], got {v!r}")


def cache_tokens(request: Request | ScoreRequest, canvas_length: int) -> int:
    """The most a request's KV cache holds (what admission counts): prompt plus every canvas."""
    if isinstance(request, ScoreRequest):
        return len(request.prompt_ids) + math.ceil(len(request.target_ids) / canvas_length) * canvas_length
    return Sequence.max_tokens(request, canvas_length)


class ScoreSequence:
    """A scoring request's state between steps: the block being scored and its running sums, on the device."""

    def __init__(self, request: ScoreRequest, cfg: ModelConfig, generator: torch.Generator,
                 device: torch.device) -> None:
        self.request = request
        self.cfg = cfg
        self.device = device
        self.length = cfg.canvas_length
        self.generator = generator
        self.samples = request.samples
        self.targets = torch.tensor(request.target_ids, dtype=torch.long, device=device)
        self.blocks = math.ceil(len(request.target_ids) / self.length)
        self.block = 0
        self.to_encode: Tensor | None = torch.tensor(request.prompt_ids, dtype=torch.long, device=device)
        self.cache: Cache | None = None
        self.canvas: Tensor | None = None  # [L]: the running step's corrupted canvas
        self.done = False
        self.decoder_passes = 0
        self.token: list[float] = []
        self.top_ids: list[list[int]] = []
        self.top: list[list[float]] = []

    @property
    def denoising(self) -> bool:
        return self.canvas is not None

    def state_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.canvas, self.truth, self.num, self.den)
                   if t is not None) if self.denoising else 0

    def begin_canvas(self) -> None:
        """Start scoring a block once its prefix is encoded: levels, sums, the first corrupted canvas."""
        self.to_encode = None
        lo = self.block * self.length
        block = self.targets[lo : lo + self.length]
        self.n = block.numel()
        self.truth = torch.zeros(self.length, dtype=torch.long, device=self.device)  # [L]: past n, never read
        self.truth[: self.n] = block
        k = self.samples
        u = torch.rand(k, generator=self.generator, device=self.device)
        self.levels = T_LO + (1 - T_LO) * (torch.arange(k, device=self.device) + u) / k  # [K], increasing
        self.num = torch.zeros(self.length, dtype=torch.float32, device=self.device)
        self.den = torch.zeros(self.length, dtype=torch.float32, device=self.device)
        kk = self.request.top_logprobs
        self.best = torch.zeros(self.length, kk, dtype=torch.float32, device=self.device)
        self.best_ids = torch.zeros(self.length, kk, dtype=torch.long, device=self.device)
        self.covered = torch.zeros(self.length, dtype=torch.bool, device=self.device)
        self.inside = torch.arange(self.length, device=self.device) < self.n  # [L]
        self.k = 0
        self._corrupt()

    def _corrupt(self) -> None:
        t = self.levels[self.k]
        r = torch.rand(self.length, generator=self.generator, device=self.device)
        z = torch.randint(0, self.cfg.vocab_size, (self.length,), generator=self.generator, device=self.device)
        self.mask = (r < t) & self.inside
        if self.k == self.samples - 1:
            self.mask |= self.inside & ~self.covered  # every position gets an estimate
        self.canvas = torch.where(self.mask | ~self.inside, z, self.truth)

    def step_input(self) -> CanvasStep:
        one = torch.ones((), dtype=torch.float32, device=self.device)
        draw = CanvasDraw(one, self.generator, False)  # unused: a scoring canvas draws nothing
        return CanvasStep(self.canvas, None, self.cache, draw, 0.0, score_ids=self.truth,
                          score_top=self.request.top_logprobs)

    def stop_flags(self, argmax: Tensor, entropy: Tensor) -> Tensor:
        return torch.zeros(2, dtype=torch.bool, device=argmax.device)

    def after_step(self, canvas: Tensor, argmax: Tensor, soft: Tensor, stable: bool, confident: bool,
                   shared: bool = False, logprobs: ScoreRows | None = None) -> list:
        """Add one sample's log-probs to the block's sums; after the last, the block's estimates."""
        if not isinstance(logprobs, ScoreRows):
            raise RuntimeError("a scoring canvas's step returned no scores")
        self.decoder_passes += 1
        w = self.mask.float() / self.levels[self.k]  # [L]
        self.num += w * logprobs.target
        self.den += w
        if logprobs.top.shape[1]:  # alternatives from the lowest level that corrupted the position
            first = (self.mask & ~self.covered)[:, None]
            self.best = torch.where(first, logprobs.top, self.best)
            self.best_ids = torch.where(first, logprobs.top_ids, self.best_ids)
        self.covered |= self.mask
        self.k += 1
        if self.k < self.samples:
            self._corrupt()
            return []
        n = self.n
        self.token += (self.num[:n] / self.den[:n]).tolist()
        self.top += self.best[:n].tolist()
        self.top_ids += self.best_ids[:n].tolist()
        self.canvas = None
        self.block += 1
        if self.block < self.blocks:
            self.to_encode = self.truth  # the clean block extends the cache, as a committed canvas does
            return []
        return [self.finish()]

    def finish(self) -> FinalEvent:
        self.done = True
        self.to_encode = None
        stats = Stats(prompt_tokens=len(self.request.prompt_ids), generated_tokens=0,
                      decoder_passes=self.decoder_passes, steps_per_canvas=[self.samples] * self.blocks,
                      cached_prompt_tokens=getattr(self.cache, "reused", 0))
        return FinalEvent(list(self.request.target_ids), "score", stats, Logprobs(self.token, self.top_ids, self.top))
