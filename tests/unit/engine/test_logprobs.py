"""Log-probabilities through the engine: kept from each canvas's commit step, and no change to any id."""

from types import SimpleNamespace

import pytest
import torch

from service.engine.api import MAX_LOGPROBS, CanvasEvent, FinalEvent, Request
from service.engine.registry import create_engine
from service.engine.sequence import Sequence
from service.errors import InvalidArgument
from service.sampler.params import GenerationParams, Pins
from service.sampler.tiles import StepLogprobs


@pytest.fixture(scope="module")
def engine(small_ckpt):
    return create_engine(checkpoint_dir=small_ckpt)


@pytest.mark.parametrize("sampler", ["fast", "reference"])
@pytest.mark.parametrize("extra", [{}, {"top_k": 5}, {"temperature": 0.0}])
def test_same_seed_same_ids_with_logprobs_on_or_off(engine, sampler, extra):
    p = GenerationParams(max_new_tokens=2 * engine.config.canvas_length, max_denoising_steps=4, sampler=sampler,
                         **extra)
    off = list(engine.generate(Request([2, 3, 4], p, seed=11)))
    on = list(engine.generate(Request([2, 3, 4], p, seed=11, logprobs=4)))
    assert [getattr(e, "tokens", None) for e in off] == [getattr(e, "tokens", None) for e in on]
    assert off[-1].token_ids == on[-1].token_ids and off[-1].logprobs is None
    final = on[-1]
    assert isinstance(final, FinalEvent) and len(final.logprobs) == len(final.token_ids)
    canvases = [e for e in on if isinstance(e, CanvasEvent)]
    assert final.logprobs.token == [v for c in canvases for v in c.logprobs.token]
    for c in canvases:
        lp = c.logprobs
        assert len(lp) == len(c.tokens) and all(v <= 0 for v in lp.token)
        for t, v, ids, top in zip(c.tokens, lp.token, lp.top_ids, lp.top):
            assert len(ids) == 4 and top == sorted(top, reverse=True)
            if t != engine.pad_id:  # a committed id is its step's argmax: the likeliest
                assert ids[0] == t and top[0] == v


def test_pinned_positions_report_zero(engine):
    length = engine.config.canvas_length
    req = Request([2, 5], GenerationParams(max_new_tokens=length, max_denoising_steps=3), seed=3,
                  pins=Pins.from_lists([7, 8, 9], [True, False, True]), logprobs=2, ignore_eos=True)
    final = list(engine.generate(req))[-1]
    assert final.token_ids[0] == 7 and final.logprobs.token[0] == 0.0 and final.logprobs.token[2] == 0.0
    assert final.logprobs.top[1][0] == final.logprobs.token[1] <= 0  # free: its argmax's


def test_logprobs_range_is_checked(engine):
    for bad in (-1, MAX_LOGPROBS + 1, True, 2.0):
        with pytest.raises(InvalidArgument) as e:
            Request([2], logprobs=bad).validate(engine.config)
        assert e.value.field == "logprobs"
    Request([2], logprobs=MAX_LOGPROBS).validate(engine.config)


def test_a_canvas_keeps_the_logprobs_of_its_commit_step():
    """Scripted steps: the committed canvas carries the last step's values, not an earlier step's."""
    cfg = SimpleNamespace(vocab_size=8, canvas_length=4)
    req = Request([2], GenerationParams(max_new_tokens=4, max_denoising_steps=3), logprobs=1,
                  pins=Pins.from_lists([0, 5], [False, True]))
    seq = Sequence(req, cfg, (1,), 0, torch.Generator(), torch.device("cpu"))
    seq.begin_canvas()
    assert seq.step_input().draw.logprobs == 1
    events = []
    for step in range(3):
        argmax = torch.tensor([3, 5, 4, 6])
        lp = StepLogprobs(torch.full((4,), -0.5 - step), torch.full((4, 1), -0.5 - step),
                          torch.tensor([[3], [2], [4], [6]]))
        events += seq.after_step(argmax, argmax, torch.zeros(4, 2), stable=False, confident=False, logprobs=lp)
    canvas = next(e for e in events if isinstance(e, CanvasEvent))
    assert canvas.logprobs.token == [-2.5, 0.0, -2.5, -2.5]  # step 3's; position 1 is pinned
    assert canvas.logprobs.top == [[-2.5]] * 4 and canvas.logprobs.top_ids == [[3], [2], [4], [6]]
    assert events[-1].logprobs.token == canvas.logprobs.token


def test_no_logprobs_asked_none_recorded():
    cfg = SimpleNamespace(vocab_size=8, canvas_length=4)
    seq = Sequence(Request([2], GenerationParams(max_new_tokens=4, max_denoising_steps=1)), cfg, (1,), 0,
                   torch.Generator(), torch.device("cpu"))
    seq.begin_canvas()
    assert seq.step_input().draw.logprobs == -1
    argmax = torch.tensor([3, 5, 4, 6])
    events = seq.after_step(argmax, argmax, torch.zeros(4, 2), stable=False, confident=False)
    assert events[0].logprobs is None and events[-1].logprobs is None
