"""The shipped tiny DiffusionGemma is a trained model, not noise.

On 48 fixed held-out snippets (tools.tiny_model.evaluate --write-test-snippets): its held-out loss is
far below chance and one decoder pass fills 16-token gaps at well above the unigram baseline; on the
first 8, the full denoising loop (suffix pinned, default sampler settings) infills better than the same
network untrained. The issue's bar for the loop, 3x the unigram baseline on the evaluation's 120
snippets, is NOT met yet (MODEL_CARD.md has the numbers); these tests guard what holds.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from service.cli import DEFAULT_CHECKPOINT
from service.engine.api import Request
from service.engine.registry import create_engine
from service.sampler.params import GenerationParams, Pins

SNIPPETS = Path(__file__).parent / "heldout_snippets.json"


@pytest.fixture(scope="module")
def engine():
    return create_engine(checkpoint_dir=DEFAULT_CHECKPOINT)


def test_checkpoint_is_small_and_complete():
    files = {p.name for p in DEFAULT_CHECKPOINT.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md"} <= files
    assert sum(p.stat().st_size for p in DEFAULT_CHECKPOINT.iterdir()) <= 16 * 2**20


def infill_accuracy(engine, data, n: int = 8) -> float:
    length = engine.config.canvas_length
    hits = total = 0
    for i, s in enumerate(data["snippets"][:n]):
        gap = length - len(s["suffix"])
        pins = Pins.from_lists([0] * gap + s["suffix"], [False] * gap + [True] * len(s["suffix"]))
        final = list(engine.generate(Request(s["prefix"], GenerationParams(max_new_tokens=length), seed=i,
                                             pins=pins)))[-1]
        hits += sum(p == t for p, t in zip(final.token_ids[: len(s["gap"])], s["gap"]))
        total += len(s["gap"])
    return hits / total


def test_infills_held_out_code_better_than_the_untrained_network(engine):
    data = json.loads(SNIPPETS.read_text())
    trained = infill_accuracy(engine, data)
    untrained = create_engine(checkpoint_dir=DEFAULT_CHECKPOINT)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in untrained.runner.model.parameters():  # the recipe's initialisation
            p.copy_(torch.randn(p.shape, generator=g) * 0.02) if p.ndim > 1 else p.fill_(1.0)
    assert trained > infill_accuracy(untrained, data)


@torch.no_grad()
def one_shot(engine, data) -> tuple[list[float], float]:
    """One decoder pass per snippet over a random gap with clean context: (losses, argmax accuracy)."""
    model, cfg = engine.runner.model, engine.config
    g = torch.Generator().manual_seed(0)
    losses, hits, total = [], 0, 0
    for s in data["snippets"]:
        cache = [model.new_cache(len(s["prefix"]) + cfg.canvas_length)]
        model.encode(torch.tensor([s["prefix"]]), [len(s["prefix"])], cache)
        free = cfg.canvas_length - len(s["suffix"])
        canvas = torch.cat([torch.randint(0, cfg.vocab_size, (free,), generator=g), torch.tensor(s["suffix"])])
        logits = model.logits(model.decode(canvas[None], None, cache))[0, : len(s["gap"])]
        losses.append(float(torch.nn.functional.cross_entropy(logits, torch.tensor(s["gap"]))))
        hits += int((logits.argmax(-1) == torch.tensor(s["gap"])).sum())
        total += len(s["gap"])
    return losses, hits / total


def test_held_out_loss_is_far_below_chance(engine):
    """Cross-entropy over the gap a nat or more under ln(V)."""
    losses, _ = one_shot(engine, json.loads(SNIPPETS.read_text()))
    assert sum(losses) / len(losses) < math.log(engine.config.vocab_size) - 1.0  # measured about ln(V) - 2.0


def test_one_pass_fills_gaps_well_above_the_unigram_baseline(engine):
    data = json.loads(SNIPPETS.read_text())
    gaps = [t for s in data["snippets"] for t in s["gap"]]
    unigram = sum(t == data["unigram_token"] for t in gaps) / len(gaps)
    _, accuracy = one_shot(engine, data)
    assert accuracy >= 1.5 * unigram  # measured 8.2% against 3.9% (2.1x) on these 48 snippets


def test_generates_text_from_a_text_prompt(engine):
    final = list(engine.generate(Request(engine.tokenizer.encode("def "), GenerationParams(max_new_tokens=64),
                                         seed=0)))[-1]
    text = engine.tokenizer.decode(final.token_ids)
    assert len(text.strip()) > 0
