"""Token-class masks from the shipped tokenizer, and masked logits through every sampler function."""

import re

import pytest
import torch

from service.cli import DEFAULT_CHECKPOINT
from service.errors import InvalidArgument
from service.text.tokenizer import load_tokenizer
from service.sampler import ops, tiles
from service.sampler.constraints import (
    FREE,
    JSON_STRING,
    NUM_CLASSES,
    JSON_STRING_OR_PAD,
    DIGITS_OR_PAD,
    NUMBER_FIRST,
    NUMBER_REST,
    NUMBER_WHOLE,
    TEXT,
    build_class_masks,
    canvas_classes,
    check_classes,
    class_masks_from_texts,
    constrain_logits,
)


def test_class_ids_are_the_interface_values():
    assert (FREE, TEXT, JSON_STRING, NUMBER_FIRST, NUMBER_REST, NUMBER_WHOLE, NUM_CLASSES) == (0, 1, 2, 3, 4, 5, 8)
    assert (JSON_STRING_OR_PAD, DIGITS_OR_PAD) == (6, 7)


@pytest.fixture(scope="module")
def shipped():
    tok = load_tokenizer(DEFAULT_CHECKPOINT)
    return tok, tok.token_texts(), build_class_masks(tok, tok.vocab_size)


def allowed_texts(texts, mask):
    return [texts[i] for i in mask.nonzero().flatten().tolist()]


def test_masks_from_the_shipped_tokenizer(shipped):
    tok, texts, masks = shipped
    assert masks.shape == (NUM_CLASSES, tok.vocab_size) and masks.dtype == torch.bool
    assert bool(masks[FREE].all())
    special = tok.special_ids()
    assert {0, 1, 2, tok.token_id("<|turn>"), tok.token_id("<turn|>")} <= special
    for c in range(1, NUM_CLASSES):
        assert not bool(masks[c, sorted(special)].any())
        assert int(masks[c].sum()) > 0
    assert int(masks[TEXT].sum()) == tok.vocab_size - len(special)
    rest = allowed_texts(texts, masks[NUMBER_REST])
    assert all(re.fullmatch("[0-9]+", t) for t in rest) and set("0123456789") <= set(rest)
    first = allowed_texts(texts, masks[NUMBER_FIRST])
    assert all(re.fullmatch("[1-9][0-9]*", t) for t in first) and "0" not in first and "7" in first
    assert not bool((masks[NUMBER_FIRST] & ~masks[NUMBER_REST]).any())
    whole = allowed_texts(texts, masks[NUMBER_WHOLE])
    assert all(re.fullmatch("0|[1-9][0-9]*", t) for t in whole) and "0" in whole and "7" in whole
    assert set(whole) == set(first) | {"0"}
    strings = allowed_texts(texts, masks[JSON_STRING])
    assert all(t and '"' not in t and "\\" not in t and "\ufffd" not in t for t in strings)
    assert not any(re.search("[\x00-\x1f\x7f]", t) for t in strings)
    # the tokenizer has quote, backslash, newline and partial-UTF-8 pieces: all left out
    for bad in ('"', "\\", "\n"):
        i = texts.index(bad)
        assert masks[TEXT, i] and not masks[JSON_STRING, i]
    assert any("\ufffd" in t for t in texts)


def test_masks_from_texts_edge_cases():
    texts = ["<pad>", "", "12", "012", "1\n", "a\"b", "x\x7f", "\ufffd", "héllo", " 3"]
    m = class_masks_from_texts(texts, special={0}, vocab_size=len(texts) + 2)
    assert m[JSON_STRING].tolist() == [False, False, True, True, False, False, False, False, True, True, False, False]
    assert m[NUMBER_REST].nonzero().flatten().tolist() == [2, 3]
    assert m[NUMBER_FIRST].nonzero().flatten().tolist() == [2]
    assert m[TEXT].tolist() == [False] + [True] * 9 + [False, False]  # ids past the tokenizer: FREE only
    assert bool(m[FREE].all())


def test_a_class_without_tokens_is_invalid_argument():
    m = class_masks_from_texts(["a", "b"], special=(), vocab_size=2)
    check_classes(m, [FREE, TEXT, JSON_STRING])
    with pytest.raises(InvalidArgument) as e:
        check_classes(m, [TEXT, NUMBER_REST])
    assert e.value.field == "constraints"


def test_canvas_classes_pad_free_and_pins_win():
    pinned = torch.tensor([False, True, False, False, False, False])
    assert canvas_classes([TEXT, NUMBER_REST, NUMBER_FIRST], 6, pinned).tolist() == [TEXT, FREE, NUMBER_FIRST, 0, 0, 0]
    assert canvas_classes([], 3).tolist() == [FREE] * 3


def test_constrained_logits_keep_every_sampler_function_finite_and_in_class():
    torch.manual_seed(0)
    length, vocab = 6, 50
    masks = torch.zeros(NUM_CLASSES, vocab, dtype=torch.bool)
    masks[FREE] = True
    masks[TEXT, 3:] = True
    masks[JSON_STRING, 10:20] = True
    masks[NUMBER_FIRST, 7] = True  # a single allowed id: zero entropy
    masks[NUMBER_REST, [0, 49]] = True  # the first and the last id
    class_ids = torch.tensor([FREE, TEXT, JSON_STRING, NUMBER_FIRST, NUMBER_REST, FREE])
    logits = torch.randn(length, vocab) * 20  # [L, V]
    logits[4, 0] = 80.0  # allowed ids may dominate blocked ones and vice versa
    logits[3, 8] = 80.0
    before = logits.clone()
    out = constrain_logits(logits, class_ids, masks)
    assert torch.equal(logits, before)  # pure
    allowed = masks[class_ids]  # [L, V]
    assert torch.equal(out[allowed], before[allowed]) and bool((out[~allowed] < -1e38).all())
    assert torch.equal(out[[0, 5]], before[[0, 5]])  # FREE rows: the same bits

    probs = torch.softmax(out, dim=-1)
    assert bool(torch.isfinite(probs).all()) and bool((probs[~allowed] == 0).all())
    h_ref, h_fast = ops.token_entropy(out), ops.fast_probs_and_entropy(out)[1]
    assert bool(torch.isfinite(h_ref).all()) and bool(torch.isfinite(h_fast).all())
    assert float(h_ref[3]) == 0.0 and abs(float(h_fast[3])) < 1e-6
    for row in range(length):  # the entropy of the allowed ids' own distribution
        expected = torch.distributions.Categorical(logits=before[row][allowed[row]]).entropy()
        assert torch.allclose(h_ref[row], expected, atol=1e-5) and torch.allclose(h_fast[row], expected, atol=1e-4)

    assert bool(allowed.gather(1, out.argmax(-1, keepdim=True)).all())
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        u = torch.rand(probs.shape[0], generator=gen)
        for ids in (tiles.reference_draw(probs, gen), tiles.inverse_cdf_draw(probs, u)):
            assert bool(allowed.gather(1, ids[:, None]).all())
    embedding = torch.randn(vocab, 8)
    assert bool(torch.isfinite(probs @ embedding).all())  # the self-conditioning input
