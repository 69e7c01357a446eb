"""Scoring (service/engine/scoring.py): the engine's estimate equals a brute-force implementation of the same
estimator on a small random network; it is reproducible, batched with generation, and validated."""

import math

import pytest
import torch

from service.engine.api import FinalEvent, Request
from service.engine.registry import create_engine
from service.engine.scoring import T_LO, ScoreRequest
from service.errors import InvalidArgument
from service.sampler.params import GenerationParams


@pytest.fixture(scope="module")
def engine(small_ckpt):
    return create_engine(checkpoint_dir=small_ckpt)


@torch.no_grad()
def brute_force(engine, context: list[int], target: list[int], samples: int, seed: int, top: int):
    """The estimator written out plainly: whole [L, V] log-softmaxes, Python loops, float64 sums."""
    model, cfg = engine.runner.model, engine.config
    length, vocab = cfg.canvas_length, cfg.vocab_size
    g = torch.Generator().manual_seed(seed)
    cache = model.new_cache(len(context) + math.ceil(len(target) / length) * length)
    model.encode(torch.tensor([context]), [len(context)], [cache])
    token, tops = [], []
    for start in range(0, len(target), length):
        block = target[start : start + length]
        n = len(block)
        u = torch.rand(samples, generator=g)
        num, den, covered, best = [0.0] * n, [0.0] * n, [False] * n, [None] * n
        for k in range(samples):
            t = float(T_LO + (1 - T_LO) * (k + u[k]) / samples)
            r = torch.rand(length, generator=g)
            z = torch.randint(0, vocab, (length,), generator=g)
            mask = [bool(r[i] < t) or (k == samples - 1 and not covered[i]) for i in range(n)]
            canvas = torch.tensor([int(z[i]) if i >= n or mask[i] else block[i] for i in range(length)])
            logp = torch.log_softmax(model.logits(model.decode(canvas[None], None, [cache]))[0], dim=-1)  # [L, V]
            for i in range(n):
                if mask[i]:
                    num[i] += float(logp[i, block[i]]) / t
                    den[i] += 1 / t
                    if not covered[i]:
                        values, ids = logp[i].sort(descending=True)
                        best[i] = (ids[:top].tolist(), values[:top].tolist())
                        covered[i] = True
        token += [a / b for a, b in zip(num, den)]
        tops += best
        if start + length < len(target):
            model.encode(torch.tensor([block]), [n], [cache])
    return token, tops


@pytest.mark.parametrize("samples,n_target", [(1, 5), (4, 16), (6, 37)])  # 37: three canvases of 16
def test_equals_brute_force(engine, samples, n_target):
    vocab = engine.config.vocab_size
    g = torch.Generator().manual_seed(n_target)
    context = torch.randint(3, vocab, (11,), generator=g).tolist()
    target = torch.randint(3, vocab, (n_target,), generator=g).tolist()
    final = list(engine.generate(ScoreRequest(context, target, samples=samples, seed=5, top_logprobs=3)))[-1]
    assert isinstance(final, FinalEvent) and final.finish_reason == "score" and final.token_ids == target
    token, tops = brute_force(engine, context, target, samples, 5, 3)
    assert final.logprobs.token == pytest.approx(token, abs=2e-4)
    assert [ids for ids, _ in tops] == final.logprobs.top_ids
    flat = lambda rows: [v for row in rows for v in row]  # noqa: E731
    assert flat(final.logprobs.top) == pytest.approx(flat(v for _, v in tops), abs=2e-4)
    assert final.stats.decoder_passes == samples * math.ceil(n_target / engine.config.canvas_length)


def test_same_seed_same_score_other_seed_other(engine):
    req = lambda seed: ScoreRequest([2, 7, 9], [11, 12, 13, 14], samples=3, seed=seed)  # noqa: E731
    a, b, c = (list(engine.generate(req(s)))[-1].logprobs.token for s in (1, 1, 2))
    assert a == b and a != c and all(v <= 0 for v in a)


def test_batched_with_generation_in_one_pass(engine):
    """A score and a generation share each decoder pass; the score matches its solo run within float tolerance."""
    solo = list(engine.generate(ScoreRequest([2, 7, 9], [11, 12, 13], samples=4, seed=3)))[-1].logprobs.token
    sched = engine.scheduler
    gen = sched.submit(Request([2, 3, 4], GenerationParams(max_new_tokens=16, max_denoising_steps=8), seed=1))
    score = sched.submit(ScoreRequest([2, 7, 9], [11, 12, 13], samples=4, seed=3))
    shared = 0
    while sched.step():
        shared = max(shared, sched.canvases_in_last_pass)
    assert shared == 2
    events = [score.next_event(0) for _ in range(1)]
    assert isinstance(events[-1], FinalEvent) and events[-1].logprobs.token == pytest.approx(solo, abs=1e-4)
    assert isinstance(list(iter(lambda: gen.next_event(0), None))[-1], FinalEvent)


@pytest.mark.parametrize("fields,name", [
    (dict(prompt_ids=[]), "prompt_ids"), (dict(target_ids=[]), "target_ids"), (dict(target_ids=[10**6]), "target_ids"),
    (dict(samples=0), "samples"), (dict(samples=129), "samples"), (dict(seed=-1), "seed"),
    (dict(top_logprobs=21), "top_logprobs"),
])
def test_invalid_fields_are_named(engine, fields, name):
    req = ScoreRequest(**{"prompt_ids": [2, 3], "target_ids": [4, 5], **fields})
    with pytest.raises(InvalidArgument) as e:
        engine.scheduler.submit(req)
    assert e.value.field == name


def test_admission_counts_the_score(engine):
    """A continuation whose cache exceeds the memory budget is refused as such."""
    from service.engine.scheduler import Limits, Scheduler
    sched = Scheduler(engine, Limits(max_memory_bytes=engine.runner.step_bytes(1) + 1000))
    with pytest.raises(InvalidArgument) as e:
        sched.submit(ScoreRequest([2, 3], [4] * 200))
    assert e.value.field == "target_ids"
