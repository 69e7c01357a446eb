"""The engine's denoising loop: pins, determinism, vocabulary, events."""

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.engine.api import CanvasEvent, DraftEvent, FinalEvent, Request
from service.engine.registry import create_engine
from service.sampler.params import GenerationParams, Pins


@pytest.fixture(scope="module")
def engine(small_ckpt):
    return create_engine(checkpoint_dir=small_ckpt)


SLOW_OK = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SLOW_OK
@given(data=st.data())
def test_pinned_tokens_never_change(engine, data):
    length, vocab = engine.config.canvas_length, engine.config.vocab_size
    n = data.draw(st.integers(1, length))
    ids = data.draw(st.lists(st.integers(0, vocab - 1), min_size=n, max_size=n))
    mask = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    seed = data.draw(st.integers(0, 2**31))
    req = Request([2, 40, 41], GenerationParams(max_new_tokens=length, max_denoising_steps=4), seed=seed,
                  pins=Pins.from_lists(ids, mask), return_drafts=True)
    events = list(engine.generate(req))
    pinned = [(i, t) for i, (t, m) in enumerate(zip(ids, mask)) if m]
    for ev in events:
        if isinstance(ev, (DraftEvent, CanvasEvent)) and ev.canvas_index == 0:
            for i, t in pinned:
                assert ev.tokens[i] == t


@SLOW_OK
@given(seed=st.integers(0, 2**62), steps=st.integers(1, 5), bound=st.floats(0.0, 3.0))
def test_same_seed_same_output_and_ids_in_vocab(engine, seed, steps, bound):
    p = GenerationParams(max_new_tokens=20, max_denoising_steps=steps, entropy_bound=bound)
    a = list(engine.generate(Request([2, 3, 4], p, seed=seed)))[-1]
    b = list(engine.generate(Request([2, 3, 4], p, seed=seed)))[-1]
    assert a.token_ids == b.token_ids
    assert all(0 <= t < engine.config.vocab_size for t in a.token_ids)


def test_events_in_order_with_drafts(engine):
    p = GenerationParams(max_new_tokens=2 * engine.config.canvas_length, max_denoising_steps=3)
    events = list(engine.generate(Request([2, 9], p, seed=5, return_drafts=True)))
    kinds = [type(e).__name__ for e in events]
    assert isinstance(events[-1], FinalEvent)
    canvases = [e for e in events if isinstance(e, CanvasEvent)]
    drafts = [e for e in events if isinstance(e, DraftEvent)]
    assert len(drafts) == sum(c.steps for c in canvases) == events[-1].stats.decoder_passes
    # each canvas's drafts come before it
    assert kinds.index("CanvasEvent") > kinds.index("DraftEvent")
    assert events[-1].token_ids == [t for c in canvases for t in c.tokens]


def test_different_seeds_differ(engine):
    p = GenerationParams(max_new_tokens=16, max_denoising_steps=2)
    a = list(engine.generate(Request([2, 3], p, seed=1)))[-1].token_ids
    b = list(engine.generate(Request([2, 3], p, seed=2)))[-1].token_ids
    assert a != b


@settings(max_examples=60, deadline=None)
@given(thr=st.integers(0, 6), pattern=st.lists(st.integers(0, 2), min_size=1, max_size=14))
def test_stability_window_is_the_last_threshold_argmaxes_unchanged(thr, pattern):
    """The stop flag's stability half over scripted argmax canvases equals its definition (the reference's:
    the argmax equals each of the last `thr` argmaxes of this canvas), at O(1) state whatever `thr`."""
    import torch

    from types import SimpleNamespace

    from service.engine.sequence import Sequence

    cfg = SimpleNamespace(vocab_size=8, canvas_length=4)  # all a Sequence reads of its config
    req = Request([2], GenerationParams(max_denoising_steps=len(pattern) + 1, stability_threshold=thr))
    seq = Sequence(req, cfg, (1,), 0, torch.Generator(), torch.device("cpu"))
    seq.begin_canvas()
    history: list[int] = []
    for p in pattern:
        argmax = torch.full((4,), p)
        stable, _ = seq.stop_flags(argmax, torch.zeros(4)).tolist()
        expected = len(history) >= thr and all(h == p for h in history[len(history) - thr:])
        assert stable == expected, (thr, history, p)
        seq.after_step(argmax, argmax, torch.zeros(4, 2), stable=False, confident=False)
        history.append(p)
    assert seq.state_nbytes() <= 3 * 4 * 8 + 2 * 4 * 8 + 8  # canvas, argmax, soft, one counter


def test_ignore_eos_runs_to_max_new_tokens_without_pad(small_ckpt):
    """Many EOS ids make an EOS within a few canvases likely: where a request ends at one, the same request
    with ignore_eos runs every canvas, its first canvas the same ids with no pad after the EOS."""
    engine = create_engine(checkpoint_dir=small_ckpt)
    engine.eos_ids = tuple(range(1, 40))
    length = engine.config.canvas_length
    kw = dict(max_new_tokens=3 * length, max_denoising_steps=3, sampler="reference")
    hits = 0
    for seed in range(4):
        plain = list(engine.generate(Request([2, 30, 31, 32], GenerationParams(**kw), seed=seed)))[-1]
        if plain.finish_reason != "eos":
            continue
        hits += 1
        full = list(engine.generate(Request([2, 30, 31, 32], GenerationParams(**kw), seed=seed, ignore_eos=True)))[-1]
        assert full.finish_reason == "length" and len(full.token_ids) == 3 * length
        assert len(full.stats.steps_per_canvas) == 3 and engine.pad_id not in full.token_ids[len(plain.token_ids) - length:]
        first_eos = next(k for k, t in enumerate(plain.token_ids) if t in engine.eos_ids)
        assert full.token_ids[:first_eos + 1] == plain.token_ids[:first_eos + 1]
    assert hits > 0


@pytest.mark.parametrize("sampler", ["fast", "reference"])
def test_greedy_is_the_same_whatever_the_seed(engine, sampler):
    p = GenerationParams(max_new_tokens=2 * engine.config.canvas_length, max_denoising_steps=4, temperature=0.0,
                         sampler=sampler)
    runs = [list(engine.generate(Request([2, 3], p, seed=s, return_drafts=True))) for s in (1, 2, 12345)]
    tokens = [[getattr(e, "tokens", None) or e.token_ids for e in run] for run in runs]
    assert tokens[0] == tokens[1] == tokens[2]
    sampled = [list(engine.generate(Request([2, 3], dataclasses.replace(p, temperature=1.0), seed=s)))[-1].token_ids
               for s in (1, 2)]
    assert sampled[0] != sampled[1]  # the same settings but sampling do depend on the seed


def test_temperature_scales_the_schedule_bit_for_bit(engine):
    base = GenerationParams(max_new_tokens=16, max_denoising_steps=3, sampler="reference")

    def out(p: GenerationParams) -> list[int]:
        return list(engine.generate(Request([2, 3], p, seed=4)))[-1].token_ids

    assert out(dataclasses.replace(base, temperature=1.0)) == out(base)
    halved = out(dataclasses.replace(base, temperature=0.5))
    assert halved == out(dataclasses.replace(base, t_min=0.2, t_max=0.4))
    assert halved != out(base)
