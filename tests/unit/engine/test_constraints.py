"""Token-class constraints on the first canvas, through the engine and the scheduler, on the shipped tiny model."""

import json

import pytest
import torch

from service.cli import DEFAULT_CHECKPOINT
from service.engine.api import CanvasEvent, DraftEvent, Request
from service.engine.scheduler import Scheduler
from service.engine.registry import create_engine
from service.errors import InvalidArgument
from service.sampler.constraints import (
    DIGITS_OR_PAD,
    FREE,
    JSON_STRING,
    JSON_STRING_OR_PAD,
    NUM_CLASSES,
    NUMBER_FIRST,
    NUMBER_REST,
    TEXT,
)
from service.sampler.params import GenerationParams, Pins

NUMBER = [NUMBER_FIRST] + [NUMBER_REST] * 3


@pytest.fixture(scope="module")
def tiny():
    return create_engine(checkpoint_dir=DEFAULT_CHECKPOINT, batch_invariant=True)  # batched == solo, bit for bit


def params(sampler="reference", steps=4):
    return GenerationParams(max_new_tokens=64, max_denoising_steps=steps, sampler=sampler)


def first_canvases(events):
    """Every token list of canvas 0: drafts and the committed canvas."""
    return [ev.tokens for ev in events if isinstance(ev, (DraftEvent, CanvasEvent)) and ev.canvas_index == 0]


def batched(engine, reqs) -> list[list[int]]:
    """Each request's final ids, the requests run together through one scheduler."""
    sched = Scheduler(engine)
    streams = [sched.submit(r) for r in reqs]
    for _ in range(200):
        if not sched.step():
            break
    return [list(s)[-1].token_ids for s in streams]


def assert_in_class(engine, tokens, constraints):
    masks = engine.class_masks()
    for i, c in enumerate(constraints):
        assert bool(masks[c, tokens[i]]), (i, c, tokens[i])


@pytest.mark.parametrize("sampler", ["reference", "fast"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_number_run_decodes_to_a_json_integer(tiny, sampler, seed):
    tok = tiny.tokenizer
    req = Request(tok.encode('{"count": '), params(sampler), seed=seed, constraints=NUMBER, return_drafts=True)
    events = list(tiny.generate(req))
    canvases = first_canvases(events)
    assert len(canvases) >= 2
    for tokens in canvases:
        assert_in_class(tiny, tokens, NUMBER)
        text = tok.decode(tokens[:4])
        assert isinstance(json.loads(text), int) and not text.startswith("0"), text


def test_a_json_string_hole_between_pinned_quotes(tiny):
    tok = tiny.tokenizer
    quote = tok.token_id('"')
    constraints = [FREE] + [JSON_STRING] * 4 + [FREE]
    pins = Pins.from_lists([quote, 0, 0, 0, 0, quote], [True, False, False, False, False, True])
    for seed in range(3):
        req = Request(tok.encode("name = "), params(), seed=seed, pins=pins, constraints=constraints)
        tokens = list(tiny.generate(req))[-1].token_ids
        assert_in_class(tiny, tokens, constraints)
        assert isinstance(json.loads(tok.decode(tokens[:6])), str)


def test_pins_win_over_constraints(tiny):
    tok = tiny.tokenizer
    letter = tok.token_id("a")
    pins = Pins.from_lists([0, letter], [False, True])
    req = Request(tok.encode("x = "), params(), seed=5, pins=pins, constraints=[NUMBER_REST] * 3, return_drafts=True)
    for tokens in first_canvases(list(tiny.generate(req))):
        assert tokens[1] == letter
        assert_in_class(tiny, [tokens[0], 0, tokens[2]], [NUMBER_REST, FREE, NUMBER_REST])


def test_an_eos_does_not_pad_over_constrained_positions(tiny):
    tok = tiny.tokenizer
    eos = tiny.eos_ids[0]
    req = Request(tok.encode("x = "), params(), seed=2, pins=Pins.from_lists([eos]), constraints=[FREE, FREE, TEXT])
    final = list(tiny.generate(req))[-1]
    assert final.finish_reason == "eos"
    tokens = final.token_ids
    assert tokens[0] == eos and tokens[1] == tiny.pad_id and tokens[3:] == [tiny.pad_id] * (len(tokens) - 3)
    assert_in_class(tiny, tokens, [FREE, FREE, TEXT])


def test_free_constraints_change_nothing(tiny):
    tok = tiny.tokenizer
    outs = [
        list(tiny.generate(Request(tok.encode("def f("), params(steps=3), seed=4, constraints=c)))[-1].token_ids
        for c in (None, [], [FREE] * 10)
    ]
    assert outs[0] == outs[1] == outs[2]


def test_constrained_request_batched_equals_solo(tiny):
    tok = tiny.tokenizer
    reqs = [
        Request(tok.encode("a = "), params(), seed=1, constraints=NUMBER),
        Request(tok.encode("b = "), params("fast"), seed=2),
        Request(tok.encode("c = "), params("fast"), seed=3, constraints=[TEXT] * 8 + NUMBER),
    ]
    solo = [list(tiny.generate(r))[-1].token_ids for r in reqs]
    assert batched(tiny, reqs) == solo


@pytest.mark.parametrize(
    "constraints",
    [[NUM_CLASSES], [-1], [True], [1.0], "1", [0] * 65],
)
def test_invalid_constraints_name_the_field(tiny, constraints):
    with pytest.raises(InvalidArgument) as e:
        list(tiny.generate(Request([2], params(), constraints=constraints)))
    assert e.value.field == "constraints"


def test_constraints_need_a_tokenizer(small_ckpt):
    engine = create_engine(checkpoint_dir=small_ckpt)
    assert engine.tokenizer is None
    req = Request([2, 3], params(), constraints=[TEXT])
    with pytest.raises(InvalidArgument) as e:
        list(engine.generate(req))
    assert e.value.field == "constraints"
    with pytest.raises(InvalidArgument) as e:  # refused at submit, not in the scheduler's loop
        Scheduler(engine).submit(req)
    assert e.value.field == "constraints"
    list(engine.generate(Request([2, 3], params(), constraints=[FREE, FREE])))  # all free: no tokenizer needed


def test_choice_sets_hold_each_position_to_its_ids(tiny):
    """A request's own classes (Request.choices): NUM_CLASSES + j allows exactly choices[j]."""
    tok = tiny.tokenizer
    sets = [[tok.token_id("t"), tok.token_id("f")], [tok.token_id("rue"), tok.token_id("alse")]]
    constraints = [NUM_CLASSES, NUM_CLASSES + 1]
    for seed in range(4):
        req = Request(tok.encode("ok = "), params(), seed=seed, constraints=constraints, choices=sets,
                      return_drafts=True)
        for tokens in first_canvases(list(tiny.generate(req))):
            assert tokens[0] in sets[0] and tokens[1] in sets[1], tokens[:2]


def test_or_pad_classes_allow_the_pad_and_their_pieces_only(tiny):
    masks = tiny.class_masks()
    for c, base in ((JSON_STRING_OR_PAD, JSON_STRING), (DIGITS_OR_PAD, NUMBER_REST)):
        assert bool(masks[c, tiny.pad_id]) and not bool(masks[base, tiny.pad_id])
        other = masks[c].clone()
        other[tiny.pad_id] = False
        assert torch.equal(other, masks[base])


def test_requests_with_their_own_choices_batched_equal_solo(tiny):
    """Canvases with different choice tables in one step: each is offset into the stacked table."""
    tok = tiny.tokenizer
    a, b = [tok.token_id("t"), tok.token_id("f")], [tok.token_id("red")]
    reqs = [
        Request(tok.encode("a = "), params(), seed=1, constraints=[NUM_CLASSES, JSON_STRING_OR_PAD], choices=[a]),
        Request(tok.encode("b = "), params("fast"), seed=2, constraints=NUMBER),
        Request(tok.encode("c = "), params(), seed=3, constraints=[TEXT, NUM_CLASSES], choices=[b]),
        Request(tok.encode("d = "), params("fast"), seed=4),
    ]
    solo = [list(tiny.generate(r))[-1].token_ids for r in reqs]
    assert solo[0][0] in a and solo[2][1] == b[0]
    assert batched(tiny, reqs) == solo


@pytest.mark.parametrize("choices, constraints", [
    ([[]], [NUM_CLASSES]), ([[5000]], [NUM_CLASSES]), ([[-1]], [NUM_CLASSES]), ("x", [NUM_CLASSES]),
    ([[3]] * 65, [NUM_CLASSES]),
])
def test_invalid_choices_name_the_field(tiny, choices, constraints):
    with pytest.raises(InvalidArgument) as e:
        list(tiny.generate(Request([2], params(), constraints=constraints, choices=choices)))
    assert e.value.field == "choices"


def test_a_class_past_the_choices_is_refused(tiny):
    with pytest.raises(InvalidArgument) as e:
        list(tiny.generate(Request([2], params(), constraints=[NUM_CLASSES + 1], choices=[[3]])))
    assert e.value.field == "constraints" and str(NUM_CLASSES + 1) in str(e.value)
