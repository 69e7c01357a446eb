"""JSON Schema -> canvas layout -> document (service/request/structured.py), with the shipped tiny tokenizer.

The documents are rendered from canvases filled at random within each position's classes, so what is checked
is the guarantee (it parses and satisfies the schema), whatever the model writes."""

import json
import random
from pathlib import Path

import pytest

from service.errors import InvalidArgument
from service.request import structured as S
from service.sampler.constraints import build_class_masks
from service.text.token_classes import DIGITS_OR_PAD, JSON_STRING, JSON_STRING_OR_PAD, NUM_CLASSES, NUMBER_REST, \
    choice_ids_of, choices_of
from service.text.tokenizer import load_tokenizer

ASSETS = Path(__file__).resolve().parents[3] / "service" / "assets" / "tiny-diffusiongemma"
CANVAS, EOS, PAD = 64, 1, 0


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ASSETS)


@pytest.fixture(scope="module")
def masks(tok):
    return build_class_masks(tok, tok.vocab_size, {EOS, PAD, 2}, PAD)


def fill(s: S.Structured, masks, rng: random.Random) -> list[int]:
    """A canvas as the engine could leave it: pins kept, every free position a random id its class allows."""
    lay = s.layout
    out = []
    for pos, (pin, pinned) in enumerate(zip(lay.pin_ids, lay.pin_mask)):
        if pinned:
            out.append(pin)
            continue
        c = lay.constraint_ids[pos]
        allowed = lay.choices[c - NUM_CLASSES] if c >= NUM_CLASSES else masks[c].nonzero().flatten().tolist()
        out.append(rng.choice(allowed))
    return out


def layout_of(tok, schema, budget=None):
    return S.structured_layout(tok, CANVAS, [2], S.compile_schema(schema, "f"), "f", eos_id=EOS, pad_id=PAD,
                               budget=budget)


PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 5, "minLength": 2},
    "age": {"type": "integer", "minimum": 18, "maximum": 99},
    "x": {"type": "number", "minimum": 0.5, "maximum": 3.5},
    "ok": {"type": "boolean"},
    "c": {"enum": ["red", "green", 7, None]},
}}


def test_random_canvases_always_render_a_valid_document(tok, masks):
    s = layout_of(tok, PERSON)
    assert len(s.layout.pin_ids) == CANVAS and s.layout.max_new_tokens == CANVAS
    rng = random.Random(0)
    docs = set()
    for _ in range(200):
        text = S.render(s, fill(s, masks, rng), tok, PAD)
        doc = json.loads(text)
        assert list(doc) == ["name", "age", "x", "ok", "c"]
        assert isinstance(doc["name"], str) and 2 <= len(doc["name"]) <= 5
        assert isinstance(doc["age"], int) and 18 <= doc["age"] <= 99
        assert 0.5 <= doc["x"] <= 3.5
        assert doc["ok"] in (True, False) and doc["c"] in ("red", "green", 7, None)
        docs.add(text)
    assert len(docs) > 150


def test_hole_classes(tok):
    s = layout_of(tok, {"type": "object", "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 4},
                                                           "n": {"type": "integer", "maximum": 999}}})
    lay = s.layout
    holes = [lay.constraint_ids[slot.start:slot.end] for slot in lay.slots]
    assert holes[0] == [JSON_STRING] * 2 + [JSON_STRING_OR_PAD] * 2  # at most maxLength tokens, minLength non-pad
    assert holes[1] == [NUMBER_REST] + [DIGITS_OR_PAD] * 2  # the maximum's digits
    assert lay.pin_ids[lay.slots[-1].end:][:1] != []


def test_an_enum_choice_takes_the_option_agreeing_most(tok):
    texts = ('"true"', '"false"', '"maybe"')  # the options as JSON text
    s = layout_of(tok, {"enum": ["true", "false", "maybe"]})
    (slot,) = s.layout.slots
    options = [tok.encode(o, add_bos=False) for o in texts]
    canvas = list(s.layout.pin_ids)
    # each position's set holds the options' tokens there (and pad where an option is shorter)
    for p in range(slot.end - slot.start):
        allowed = set(s.layout.choices[s.layout.constraint_ids[slot.start + p] - NUM_CLASSES])
        assert allowed == {o[p] if p < len(o) else PAD for o in options}
    for k, o in enumerate(options):
        canvas[slot.start:slot.end] = o + [PAD] * (slot.end - slot.start - len(o))
        assert S.render(s, canvas, tok, PAD) == texts[k]
    mixed = [*options[0][:2], *options[1][2:]]  # "true" agrees with more positions than "false"
    canvas[slot.start:slot.end] = mixed + [PAD] * (slot.end - slot.start - len(mixed))
    assert S.render(s, canvas, tok, PAD) == texts[0], (options, mixed)


def test_strings_share_what_the_budget_leaves(tok):
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}}}
    wide = layout_of(tok, schema)
    assert [s.end - s.start for s in wide.layout.slots] == [S.DEFAULT_STRING_TOKENS] * 2
    narrow = layout_of(tok, schema, budget=24)
    sizes = [s.end - s.start for s in narrow.layout.slots]
    assert sizes[0] == sizes[1] < S.DEFAULT_STRING_TOKENS
    used = narrow.layout.pin_mask.index(True, narrow.layout.slots[-1].end)  # the closing literal, then EOS
    eos_at = len(narrow.layout.pin_ids) - narrow.layout.pin_ids[::-1].index(EOS) - 1
    assert eos_at < 24 and used < eos_at
    with pytest.raises(InvalidArgument) as e:
        layout_of(tok, schema, budget=10)
    assert e.value.field == "f" and "request allows 10" in str(e.value)


@pytest.mark.parametrize("schema, path", [
    ({"type": "string", "pattern": "a"}, "f.pattern"),
    ({"type": "object", "properties": {"a": {"type": "string", "format": "date"}}}, "f.properties.a.format"),
    ({"type": "integer", "multipleOf": 2}, "f.multipleOf"),
    ({"type": "integer", "exclusiveMinimum": 2}, "f.exclusiveMinimum"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "f.uniqueItems"),
    ({"type": "tuple"}, "f.type"),
    ({"description": "anything"}, "f.type"),
    ({"$ref": "http://x/y"}, "f.$ref"),
    ({"$ref": "#/$defs/Nope"}, "f.$ref"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}, "$defs": {"A": {"type": "string",
                                                                                    "pattern": "x"}}},
     "f.$defs.A.pattern"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "f.minLength"),
    ({"type": "integer", "minimum": 1.2, "maximum": 1.8}, "f.minimum"),
    ({"type": "integer", "maximum": float("inf")}, "f.maximum"),
    ({"enum": []}, "f.enum"),
    ({"type": "object", "properties": {"a": {"const": 1}}}, "f"),  # nothing left to generate
    ("not a schema", "f"),
])
def test_unsupported_constructs_are_refused_naming_them(tok, schema, path):
    with pytest.raises(InvalidArgument) as e:
        layout_of(tok, schema)
    assert e.value.field == path, e.value


def test_recursive_refs_stop(tok):
    schema = {"$ref": "#/$defs/A", "$defs": {"A": {"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}}}}
    with pytest.raises(InvalidArgument) as e:
        layout_of(tok, schema)
    assert "deeper" in str(e.value)


def test_arrays_anyof_type_lists_and_consts(tok, masks):
    schema = {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "integer", "maximum": 9}, "minItems": 3},
        "opt": {"anyOf": [{"type": "null"}, {"type": "integer", "maximum": 5}]},
        "t": {"type": ["null", "boolean"]},
        "v": {"const": "v1"},
        "none": {"type": "array", "items": {"type": "string"}, "maxItems": 0},
    }}
    s = layout_of(tok, schema)
    doc = json.loads(S.render(s, fill(s, masks, random.Random(1)), tok, PAD))
    assert len(doc["tags"]) == 3 and all(0 <= t <= 9 for t in doc["tags"])
    assert 0 <= doc["opt"] <= 5 and isinstance(doc["t"], bool) and doc["v"] == "v1" and doc["none"] == []


def test_choice_ids_round_trip():
    sets = [[5, 9], [7], [0, 1, 2]]
    assert choices_of(choice_ids_of(sets)) == sets
    with pytest.raises(InvalidArgument) as e:
        choices_of([5, 9])
    assert e.value.field == "choice_ids"
