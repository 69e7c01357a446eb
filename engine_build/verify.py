"""Verification: the build against the unquantized source on held-out prompts with the same seeds.

Both directories load through the serving path (`create_engine`, so a quantized build is dequantized at load on
a CPU, as `dgemma serve` would load it), one at a time: never two models in memory.

1. The source alone: the free-running requests, then its logits along its own denoising trajectories (stored:
   `_SourcePasses`). Then it is freed.
2. The build alone: the same free-running requests, then its decoder along the source's trajectories, compared
   with the stored source logits.

- free-running: the same requests with the same seeds on both; `sequence_agreement` is the fraction of equal
  output tokens position by position, and `steps_per_canvas` the mean denoising steps each took. One token that
  flips under sampling changes every later step of that canvas, so this figure falls fast (a bf16 copy of the
  tiny model scores ~0.89); it is reported, not gated.
- teacher-forced: along the source's own denoising trajectory (its draft canvas after each step, re-noised to the
  step's noise level, the source's previous logits as self-conditioning), both decoders see identical inputs;
  `token_agreement` is the fraction of positions where their argmax tokens agree and `mean_kl` the mean
  KL(source || build) of their logits. `token_agreement` is what the threshold gates. The figures equal those
  of both models run side by side (the source's float32 logits are stored as computed).
- NVFP4 only, reported: `w4a4_emulated`, the same teacher-forced figures with the experts on the NVFP4 runtime's
  emulation (service.model.nvfp4_runtime: activations quantized to FP4 as a Blackwell GPU would, the operands
  decoded and multiplied in float32) instead of weights dequantized at load.

Device and dtype: engine_build.placement (a GPU runs bfloat16: UNVERIFIED).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from engine_build.placement import Placement, choose, free_memory
from service.errors import CheckpointError

# Default minimum token agreement per precision. fp32 is a bit-exact copy; NVFP4 (4.5 bits on the experts) is
# allowed further from the source than FP8 (docs/build.md, "Verification").
THRESHOLDS = {"fp32": 1.0, "bf16": 0.95, "fp8": 0.95, "nvfp4": 0.90}
# The stored source logits stay in memory up to this many bytes in all, else spill to a temporary directory
# (the real shape: 8 prompts x 2 seeds x 8 passes x 256 x 262,144 float32 = 32 GiB).
MEMORY_BUDGET = 1 << 30


@dataclass(frozen=True)
class VerifySettings:
    prompts: tuple[str, ...]
    seeds: tuple[int, ...] = (0, 1)
    max_denoising_steps: int = 8
    threads: int | None = None  # torch threads of the engines (None: as set for the process)
    device: str = "auto"  # "auto", "cpu" or "cuda" (engine_build.placement)
    scratch: Path | None = None  # where stored source logits spill (None: the system's temp dir, $TMPDIR)


def _runtime(precision: str, place: Placement, native: bool) -> str:
    where = f"torch {place.device} {place.dtype_name}"
    unverified = "; the GPU path is UNVERIFIED" if place.device == "cuda" else ""
    if precision in ("fp8", "nvfp4"):
        how = f"on the {precision} kernels" if native else "dequantized at load"
        return f"{where}, {precision} weights {how}{unverified}"
    return f"{where} ({precision} weights){unverified}"


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


def pass_inputs(drafts: list[list[int]], length: int, vocab: int, seed: int) -> list[Tensor]:
    """The canvases [L] (CPU) of one teacher-forced trajectory: pure noise, then each draft but the last,
    re-noised to its step's level. Seeded: the source and the build see the very same ones."""
    g = torch.Generator().manual_seed(seed)
    n = len(drafts)
    inputs = [torch.randint(0, vocab, (length,), generator=g)]  # step 1 sees pure noise
    for k, d in enumerate(drafts[:-1], 1):  # step k+1 sees step k's draft, re-noised to its level
        base = torch.tensor(d[:length])
        noise = torch.rand(length, generator=g) < 1 - k / n
        inputs.append(torch.where(noise, torch.randint(0, vocab, (length,), generator=g), base))
    return inputs


def _passes(model, prompt: list[int], inputs: list[Tensor], teacher: Tensor | None) -> Iterator[tuple[Tensor, Tensor]]:
    """Per input canvas, after the prompt's encoder pass: (the model's logits [1, L, V], the leading logits [1, L, V]
    whose softmax self-conditions the next pass: `teacher`'s stored ones [passes, L, V], else the model's own)."""
    dev = model.device
    caches = [model.new_cache(len(prompt) + model.cfg.canvas_length)]
    model.encode(torch.tensor([prompt], device=dev), [len(prompt)], caches)
    probs = None
    for k, canvas in enumerate(inputs):
        soft = None if probs is None else model.soft_embedding(probs)
        logits = model.logits(model.decode(canvas[None].to(dev), soft, caches))
        lead = logits if teacher is None else teacher[k][None].to(dev)
        yield logits, lead
        probs = torch.softmax(lead, -1)


@torch.no_grad()
def source_logits(ref, prompt: list[int], drafts: list[list[int]], vocab: int, seed: int) -> Tensor:
    """The source's float32 logits [passes, L, V] on the CPU along its own trajectory."""
    inputs = pass_inputs(drafts, ref.cfg.canvas_length, vocab, seed)
    out = torch.empty(len(inputs), ref.cfg.canvas_length, vocab)
    for k, (lr, _) in enumerate(_passes(ref, prompt, inputs, None)):
        out[k] = lr[0]
    return out


@torch.no_grad()
def compare(got, prompt: list[int], drafts: list[list[int]], vocab: int, seed: int,
            ref_logits: Tensor) -> tuple[int, int, list[float]]:
    """(agreeing argmax positions, positions, per-pass mean KL(source || build)) of the build's decoder over one
    source trajectory, against that trajectory's stored source logits (`source_logits`)."""
    same = total = 0
    kls = []
    for lg, lr in _passes(got, prompt, pass_inputs(drafts, got.cfg.canvas_length, vocab, seed), ref_logits):
        lp, lq = torch.log_softmax(lr, -1), torch.log_softmax(lg, -1)
        kls.append(float((lp.exp() * (lp - lq)).sum(-1).mean()))
        same += int((lr.argmax(-1) == lg.argmax(-1)).sum())
        total += lr.shape[1]
    return same, total, kls


class _SourcePasses:
    """The source's logits of every run, float32 [passes, L, V] each: in memory while they fit MEMORY_BUDGET,
    else one file per run in a temporary directory, read back memory-mapped one run at a time."""

    def __init__(self, nbytes: int, scratch: Path | None) -> None:
        spill = nbytes > MEMORY_BUDGET
        self._dir = tempfile.TemporaryDirectory(prefix="dgemma-verify-", dir=scratch) if spill else None
        self._runs: list[Tensor | Path] = []

    def add(self, logits: Tensor) -> None:
        if self._dir is None:
            self._runs.append(logits)
            return
        path = Path(self._dir.name) / f"run-{len(self._runs)}.pt"
        torch.save(logits, path)
        self._runs.append(path)

    def __getitem__(self, i: int) -> Tensor:
        run = self._runs[i]
        return run if isinstance(run, Tensor) else torch.load(run, mmap=True, weights_only=True)

    def close(self) -> None:
        self._runs.clear()
        if self._dir is not None:
            self._dir.cleanup()


def _compare_all(got_model, prompts: list[list[int]], runs: list[_Run], store: _SourcePasses,
                 settings: VerifySettings, vocab: int) -> tuple[float, float]:
    """(token agreement, mean KL) of `got_model` against the stored source logits over every source run."""
    same = total = 0
    kls: list[float] = []
    for i, run in enumerate(runs):
        s, t, k = compare(got_model, prompts[i // len(settings.seeds)], run.drafts, vocab, i, store[i])
        same, total, kls = same + s, total + t, kls + k
    return same / total, _mean(kls)


def _native(precision: str, device: str) -> bool:
    """Whether the serving loader keeps this precision's packed weights on `device` (else it dequantizes)."""
    if precision == "fp8":
        from service.model.fp8_runtime import fp8_native_reason

        return fp8_native_reason(device) is None
    if precision == "nvfp4":
        from service.model.nvfp4_runtime import nvfp4_native_reason

        return nvfp4_native_reason(device) is None
    return False


def verify(build: str | Path, source: str | Path, precision: str, settings: VerifySettings,
           threshold: float | None = None) -> dict:
    """Run the verification; returns verify.json's content (`passed` against `threshold`)."""
    from service.engine.registry import create_engine
    from service.model.config import read_config
    from service.model.quantized import read_quant_config

    build, source = Path(build), Path(source)
    threshold = THRESHOLDS[precision] if threshold is None else threshold
    started = time.monotonic()
    place = choose(settings.device, source)
    kw = dict(device=place.device, dtype=place.dtype_name, threads=settings.threads)
    try:  # a build whose config the loader refuses fails here, before any work on the source
        read_config(build), read_quant_config(build)
    except CheckpointError as e:
        if precision == "nvfp4":  # a loader that cannot dequantize NVFP4 here: recorded, never passed
            return not_run(settings, threshold, f"the build does not load on this machine ({e.message})")
        raise

    # 1. the source alone
    engine = create_engine("torch", checkpoint_dir=source, **kw)
    tok = engine.tokenizer
    if tok is None:
        raise CheckpointError("--checkpoint: the source has no tokenizer.json; verification prompts need one")
    prompts = [tok.encode(p) for p in settings.prompts]
    vocab, length = engine.config.vocab_size, engine.config.canvas_length
    ref = _generate_all(engine, prompts, settings)
    store = _SourcePasses(sum(len(r.drafts) for r in ref) * length * vocab * 4, settings.scratch)
    try:
        for i, run in enumerate(ref):
            store.add(source_logits(engine.runner.model, prompts[i // len(settings.seeds)], run.drafts, vocab, i))
        engine = None  # the source's only reference: freed before the build loads
        free_memory(place.device)

        # 2. the build alone
        try:
            engine = create_engine("torch", checkpoint_dir=build, **kw)
        except CheckpointError as e:
            if precision == "nvfp4":
                return not_run(settings, threshold, f"the build does not load on this machine ({e.message})")
            raise
        got = _generate_all(engine, prompts, settings)
        got_model = engine.runner.model
        token_agreement, mean_kl = _compare_all(got_model, prompts, ref, store, settings, vocab)
        native = _native(precision, place.device)
        extra = {}
        if precision == "nvfp4" and not native:  # the experts' activations in FP4 too, as on Blackwell (reported)
            from service.model.loading import stored_tensors
            from service.model.nvfp4_runtime import apply_nvfp4

            apply_nvfp4(got_model, stored_tensors(build), emulate=True)
            agreement, kl = _compare_all(got_model, prompts, ref, store, settings, vocab)
            extra["w4a4_emulated"] = {"token_agreement": round(agreement, 6), "mean_kl": kl}
    finally:
        store.close()
    passed = token_agreement >= threshold
    return {"prompts": len(prompts), "seeds": list(settings.seeds), "token_agreement": round(token_agreement, 6),
            "mean_kl": mean_kl, **extra,
            "sequence_agreement": round(sequence_agreement([r.tokens for r in ref], [g.tokens for g in got]), 6),
            "steps_per_canvas": {"reference": _mean([s for r in ref for s in r.steps]),
                                 "build": _mean([s for g in got for s in g.steps])},
            "threshold": threshold, "passed": passed, "status": "passed" if passed else "failed",
            "runtime": _runtime(precision, place, native), "max_denoising_steps": settings.max_denoising_steps,
            "seconds": round(time.monotonic() - started, 1)}
