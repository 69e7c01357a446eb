"""Verification: the build against the unquantized source on held-out prompts with the same seeds.

Both directories load through the serving path (`create_engine`, so a quantized build is dequantized at load on
a CPU, as `dgemma serve` would load it), then:

- free-running: the same requests with the same seeds on both; `sequence_agreement` is the fraction of equal
  output tokens position by position, and `steps_per_canvas` the mean denoising steps each took. One token that
  flips under sampling changes every later step of that canvas, so this figure falls fast (a bf16 copy of the
  tiny model scores ~0.89); it is reported, not gated.
- teacher-forced: along the source's own denoising trajectory (its draft canvas after each step, re-noised to the
  step's noise level, the source's previous logits as self-conditioning), both decoders see identical inputs;
  `token_agreement` is the fraction of positions where their argmax tokens agree and `mean_kl` the mean
  KL(source || build) of their logits. `token_agreement` is what the threshold gates.
- NVFP4 only, reported: `w4a4_emulated`, the same teacher-forced figures with the experts on the NVFP4 runtime's
  emulation (service.model.nvfp4_runtime: activations quantized to FP4 as a Blackwell GPU would, the operands
  decoded and multiplied in float32) instead of weights dequantized at load.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from service.errors import CheckpointError

# Default minimum token agreement per precision. fp32 is a bit-exact copy; NVFP4 (4.5 bits on the experts) is
# allowed further from the source than FP8 (docs/build.md, "Verification").
THRESHOLDS = {"fp32": 1.0, "bf16": 0.95, "fp8": 0.95, "nvfp4": 0.90}


@dataclass(frozen=True)
class VerifySettings:
    prompts: tuple[str, ...]
    seeds: tuple[int, ...] = (0, 1)
    max_denoising_steps: int = 8
    threads: int | None = None  # torch threads of the engines (None: as set for the process)


def _runtime(precision: str) -> str:
    if precision in ("fp8", "nvfp4"):
        return f"torch cpu float32, {precision} weights dequantized at load"
    return f"torch cpu float32 ({precision} weights)"


def not_run(settings: VerifySettings, threshold: float, reason: str) -> dict:
    """verify.json for a build that could not be run here: never a pass."""
    return {"prompts": len(settings.prompts), "seeds": list(settings.seeds), "token_agreement": None,
            "mean_kl": None, "sequence_agreement": None, "steps_per_canvas": None, "threshold": threshold,
            "passed": False, "status": "not_run", "runtime": f"not run: {reason}"}


@dataclass
class _Run:
    tokens: list[int]
    steps: list[int]
    drafts: list[list[int]]  # argmax canvas after each step of the first canvas


def _generate_all(engine, prompts: list[list[int]], settings: VerifySettings) -> list[_Run]:
    from service.engine.api import DraftEvent, FinalEvent, Request

    params = dataclasses.replace(engine.default_params, max_new_tokens=engine.config.canvas_length,
                                 max_denoising_steps=settings.max_denoising_steps).validate()
    runs = []
    for ids in prompts:
        for seed in settings.seeds:
            events = list(engine.generate(Request(prompt_ids=ids, params=params, seed=seed, return_drafts=True)))
            final = events[-1]
            assert isinstance(final, FinalEvent)
            drafts = [e.tokens for e in events if isinstance(e, DraftEvent) and e.canvas_index == 0]
            runs.append(_Run(final.token_ids, final.stats.steps_per_canvas, drafts))
    return runs


def sequence_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Matching positions over all positions (the longer output of each pair counts)."""
    same = total = 0
    for x, y in zip(a, b, strict=True):
        same += sum(1 for i in range(min(len(x), len(y))) if x[i] == y[i])
        total += max(len(x), len(y))
    return same / total if total else 1.0


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


@torch.no_grad()
def teacher_forced(ref, got, prompt: list[int], drafts: list[list[int]], vocab: int, seed: int) -> tuple[int, int,
                                                                                                          list[float]]:
    """(agreeing argmax positions, positions, per-pass mean KL) of both decoders over one source trajectory."""
    g = torch.Generator().manual_seed(seed)
    length = ref.cfg.canvas_length
    caches = {}
    for name, m in (("ref", ref), ("got", got)):
        caches[name] = [m.new_cache(len(prompt) + length)]
        m.encode(torch.tensor([prompt]), [len(prompt)], caches[name])
    n = len(drafts)
    inputs = [torch.randint(0, vocab, (length,), generator=g)]  # step 1 sees pure noise
    for k, d in enumerate(drafts[:-1], 1):  # step k+1 sees step k's draft, re-noised to its level
        base = torch.tensor(d[:length])
        noise = torch.rand(length, generator=g) < 1 - k / n
        inputs.append(torch.where(noise, torch.randint(0, vocab, (length,), generator=g), base))
    same = total = 0
    kls, probs = [], None
    for canvas in inputs:
        lr = ref.logits(ref.decode(canvas[None], None if probs is None else ref.soft_embedding(probs), caches["ref"]))
        lg = got.logits(got.decode(canvas[None], None if probs is None else got.soft_embedding(probs), caches["got"]))
        lp, lq = torch.log_softmax(lr, -1), torch.log_softmax(lg, -1)
        kls.append(float((lp.exp() * (lp - lq)).sum(-1).mean()))
        same += int((lr.argmax(-1) == lg.argmax(-1)).sum())
        total += lr.shape[1]
        probs = torch.softmax(lr, -1)
    return same, total, kls


def _teacher_forced_all(ref_model, got_model, prompts: list[list[int]], runs: list[_Run], settings: VerifySettings,
                        vocab: int) -> tuple[float, float]:
    """(token agreement, mean KL) of `got_model` against `ref_model` over every source run's trajectory."""
    same = total = 0
    kls: list[float] = []
    for i, run in enumerate(runs):
        s, t, k = teacher_forced(ref_model, got_model, prompts[i // len(settings.seeds)], run.drafts, vocab, seed=i)
        same, total, kls = same + s, total + t, kls + k
    return same / total, _mean(kls)


def verify(build: str | Path, source: str | Path, precision: str, settings: VerifySettings,
           threshold: float | None = None) -> dict:
    """Run the verification; returns verify.json's content (`passed` against `threshold`)."""
    from service.engine.registry import create_engine

    build, source = Path(build), Path(source)
    threshold = THRESHOLDS[precision] if threshold is None else threshold
    started = time.monotonic()
    kw = dict(device="cpu", dtype="float32", threads=settings.threads)
    ref_engine = create_engine("torch", checkpoint_dir=source, **kw)
    try:
        got_engine = create_engine("torch", checkpoint_dir=build, **kw)
    except CheckpointError as e:
        if precision == "nvfp4":  # a loader that cannot dequantize NVFP4 here: recorded, never passed
            return not_run(settings, threshold, f"the build does not load on this machine ({e.message})")
        raise
    tok = ref_engine.tokenizer
    if tok is None:
        raise CheckpointError("--checkpoint: the source has no tokenizer.json; verification prompts need one")
    prompts = [tok.encode(p) for p in settings.prompts]
    ref, got = _generate_all(ref_engine, prompts, settings), _generate_all(got_engine, prompts, settings)
    ref_model, got_model = ref_engine.runner.model, got_engine.runner.model
    vocab = ref_engine.config.vocab_size
    token_agreement, mean_kl = _teacher_forced_all(ref_model, got_model, prompts, ref, settings, vocab)
    passed = token_agreement >= threshold
    extra = {}
    if precision == "nvfp4":  # what a Blackwell GPU computes: the experts' activations in FP4 too (reported)
        from service.model.loading import stored_tensors
        from service.model.nvfp4_runtime import apply_nvfp4

        apply_nvfp4(got_model, stored_tensors(build), emulate=True)
        agreement, kl = _teacher_forced_all(ref_model, got_model, prompts, ref, settings, vocab)
        extra["w4a4_emulated"] = {"token_agreement": round(agreement, 6), "mean_kl": kl}
    return {"prompts": len(prompts), "seeds": list(settings.seeds), "token_agreement": round(token_agreement, 6),
            "mean_kl": mean_kl, **extra,
            "sequence_agreement": round(sequence_agreement([r.tokens for r in ref], [g.tokens for g in got]), 6),
            "steps_per_canvas": {"reference": _mean([s for r in ref for s in r.steps]),
                                 "build": _mean([s for g in got for s in g.steps])},
            "threshold": threshold, "passed": passed, "status": "passed" if passed else "failed",
            "runtime": _runtime(precision), "max_denoising_steps": settings.max_denoising_steps,
            "seconds": round(time.monotonic() - started, 1)}
