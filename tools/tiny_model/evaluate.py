"""Measure the tiny model on held-out standard-library files; prints one JSON object.

`python -m tools.tiny_model.evaluate [--checkpoint DIR] [--snippets 200] [--fit-batches N]`
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from collections import Counter
from pathlib import Path

import torch

from service.engine.api import Request
from service.engine.local import LocalEngine
from service.engine.registry import create_engine
from service.sampler import ops
from service.sampler.params import GenerationParams, Pins
from tools.tiny_model.corpus import read_texts

GAP, CONTEXT = 16, 48


def held_out_snippets(tokenizer, n: int, seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    """(prefix, gap, suffix) id triples from held-out files, at fixed random offsets."""
    rng = random.Random(seed)
    docs = [tokenizer.encode(t, add_bos=False) for t in read_texts(held_out=True)]
    docs = [d for d in docs if len(d) >= 2 * CONTEXT + GAP + 1]
    out = []
    for _ in range(n):
        d = rng.choice(docs)
        s = rng.randrange(0, len(d) - (2 * CONTEXT + GAP))
        out.append(
            (d[s : s + CONTEXT], d[s + CONTEXT : s + CONTEXT + GAP], d[s + CONTEXT + GAP : s + 2 * CONTEXT + GAP])
        )
    return out


def infill(engine: LocalEngine, prefix: list[int], suffix: list[int], seed: int,
           params: GenerationParams | None = None) -> tuple[list[int], int]:
    """Prefix as the prompt, suffix pinned at the canvas's end; returns the gap ids and steps used.
    `params`: the sampler settings (default: the reference's defaults and random stream, as the MODEL_CARD measured)."""
    length = engine.config.canvas_length
    gap = length - len(suffix)
    pins = Pins.from_lists([0] * gap + suffix, [False] * gap + [True] * len(suffix))
    params = dataclasses.replace(params or GenerationParams(sampler="reference"), max_new_tokens=length)
    final = list(engine.generate(Request(prefix, params, seed=seed, pins=pins)))[-1]
    return final.token_ids[:gap], final.stats.steps_per_canvas[0]


def infill_accuracy(engine: LocalEngine, snippets, params: GenerationParams | None = None) -> tuple[float, float]:
    hits = total = steps = 0
    for i, (prefix, gap, suffix) in enumerate(snippets):
        pred, n = infill(engine, prefix, suffix, seed=i, params=params)
        hits += sum(p == t for p, t in zip(pred, gap))
        total += len(gap)
        steps += n
    return hits / total, steps / len(snippets)


@torch.no_grad()
def one_shot_accuracy(engine: LocalEngine, snippets) -> float:
    """One decoder pass: random gap tokens, clean suffix; argmax at the gap."""
    model, cfg = engine.runner.model, engine.config
    hits = total = 0
    g = torch.Generator().manual_seed(0)
    for prefix, gap, suffix in snippets:
        cache = [model.new_cache(len(prefix) + cfg.canvas_length)]
        model.encode(torch.tensor([prefix]), [len(prefix)], cache)
        free = cfg.canvas_length - len(suffix)
        canvas = torch.cat([ops.init_canvas(free, cfg.vocab_size, g), torch.tensor(suffix)])
        pred = model.logits(model.decode(canvas[None], None, cache))[0, :GAP].argmax(-1).tolist()
        hits += sum(p == t for p, t in zip(pred, gap))
        total += len(gap)
    return hits / total


def unigram_token(tokenizer) -> int:
    """The most frequent token of the training files."""
    counts: Counter[int] = Counter()
    for text in read_texts(held_out=False):
        counts.update(tokenizer.encode(text, add_bos=False))
    return counts.most_common(1)[0][0]


def unigram_baseline(top: int, snippets) -> float:
    gaps = [t for _, gap, _ in snippets for t in gap]
    return sum(t == top for t in gaps) / len(gaps)


def untrained_engine(checkpoint: Path) -> LocalEngine:
    from tools.tiny_model.train import init_weights

    engine = create_engine(checkpoint_dir=checkpoint, dtype="float32")
    init_weights(engine.runner.model, seed=0)
    engine.runner.model.reset_buffers()
    return engine


def denoising_loss(engine: LocalEngine, held_out: bool, batches: int, seed: int = 5) -> float:
    """Mean cross-entropy (nats) on the noised canvas positions of `batches` batches of 16 windows of the
    training or held-out files, corrupted as the shipped recipe trains (no self-conditioning)."""
    from tokenizers import Tokenizer as HFTokenizer

    from tools.tiny_model.objective import corrupt, forward_train
    from tools.tiny_model.tokenizer import id_stream
    from tools.tiny_model.train import batch

    tok = HFTokenizer.from_file(str(engine.checkpoint_dir / "tokenizer.json"))
    data = torch.tensor(id_stream(tok, read_texts(held_out=held_out)))
    model, g = engine.runner.model, torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    with torch.no_grad():
        for _ in range(batches):
            prefix, clean = batch(data, 16, g, model.device, max_prefix=80)
            noisy, noised = corrupt(clean, model.cfg.vocab_size, g, span_fraction=0.75, span_min_noise=0.05)
            logits = forward_train(model, prefix, noisy, None)  # [B, L, V]
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), clean.flatten(), reduction="none")
            total += float(ce[noised.flatten()].sum())
            count += int(noised.sum())
    return total / count


def main(argv: list[str] | None = None) -> int:
    from tools.tiny_model.train import DEFAULT_OUT

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--snippets", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--write-test-snippets",
        type=Path,
        default=None,
        help="also write N held-out snippets (ids) and the unigram token for the quick test",
    )
    ap.add_argument("--test-snippets", type=int, default=48)
    ap.add_argument("--fit-batches", type=int, default=0,
                    help="also the denoising loss on training and held-out files over N batches (overfitting?)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    engine = create_engine(checkpoint_dir=a.checkpoint, dtype="float32")
    snippets = held_out_snippets(engine.tokenizer, a.snippets)
    top = unigram_token(engine.tokenizer)
    if a.write_test_snippets is not None:
        test = held_out_snippets(engine.tokenizer, a.test_snippets, seed=1)
        a.write_test_snippets.parent.mkdir(parents=True, exist_ok=True)
        a.write_test_snippets.write_text(
            json.dumps(
                {
                    "unigram_token": top,
                    "snippets": [{"prefix": p, "gap": g, "suffix": s} for p, g, s in test],
                }
            )
        )
    acc, steps = infill_accuracy(engine, snippets)
    untrained_acc, _ = infill_accuracy(untrained_engine(a.checkpoint), snippets)
    result = {
        "snippets": len(snippets),
        "gap_tokens": GAP,
        "context_tokens_each_side": CONTEXT,
        "infill_token_accuracy": round(acc, 4),
        "untrained_infill_token_accuracy": round(untrained_acc, 4),
        "unigram_baseline_accuracy": round(unigram_baseline(top, snippets), 4),
        "one_shot_accuracy": round(one_shot_accuracy(engine, snippets), 4),
        "mean_steps_per_canvas": round(steps, 2),
    }
    # The same loop with the checkpoint's own generation_config.json (what `dgemma` uses by default),
    # when it sets anything the reference's defaults do not.
    tuned = {k: v for k, v in dataclasses.asdict(engine.default_params).items()
             if k != "max_new_tokens" and v != getattr(GenerationParams(), k)}
    if tuned:
        tuned_acc, tuned_steps = infill_accuracy(engine, snippets, engine.default_params)
        result.update(generation_config=tuned, infill_token_accuracy_generation_config=round(tuned_acc, 4),
                      mean_steps_per_canvas_generation_config=round(tuned_steps, 2))
    if a.fit_batches:
        result.update({f"denoising_loss_{name}": round(denoising_loss(engine, held, a.fit_batches), 3)
                       for name, held in (("train", False), ("held_out", True))})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
