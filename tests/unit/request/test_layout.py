"""Canvas layouts for Infill / Edit / Template and their reassembly, with the shipped tiny tokenizer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.errors import InvalidArgument
from service.request import layout as L
from service.request.layout import (
    Hole,
    LiteralSegment,
    Slot,
    Span,
    assemble,
    edit_layout,
    infill_layout,
    parse_skeleton,
    template_layout,
)
from service.model.config import read_config
from service.text.tokenizer import load_tokenizer

ASSETS = Path(__file__).resolve().parents[3] / "service" / "assets" / "tiny-diffusiongemma"
CANVAS = 64


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ASSETS)


@pytest.fixture(scope="module")
def ids():
    cfg = read_config(ASSETS)
    return {"eos_id": cfg.eos_token_ids[0], "pad_id": cfg.pad_token_id}


def enc(tok, text):
    return tok.encode(text, add_bos=False)


def fill(layout, slot_ids):
    """A fake output: the pins where pinned, slot_ids[value index] in each slot (pad past their end)."""
    out = list(layout.pin_ids)
    for slot in layout.slots:
        new = list(slot_ids[slot.index])[: slot.end - slot.start]
        out[slot.start:slot.end] = new + [0] * (slot.end - slot.start - len(new))
    return out


def check_lengths(layout):
    n = len(layout.pin_ids)
    assert len(layout.pin_mask) == n and len(layout.constraint_ids) == n and layout.max_new_tokens == n


# ---------------------------------------------------------------------------------------------------
# Infill


def test_infill_positions_pins_and_prompt(tok):
    lay = infill_layout(tok, CANVAS, "def add(a, b):", "\n    return c\n", 5)
    suffix = enc(tok, "\n    return c\n")
    check_lengths(lay)
    assert lay.prompt_ids == tok.encode("def add(a, b):")
    assert lay.pin_mask == [False] * 5 + [True] * len(suffix)
    assert lay.pin_ids == [0] * 5 + suffix
    assert lay.constraint_ids == [L.FREE] * len(lay.pin_ids)
    assert lay.max_new_tokens == 5 + len(suffix)
    assert lay.segments == [LiteralSegment("def add(a, b):"), Slot(0, 5, 0, None, "free"),
                            LiteralSegment("\n    return c\n")]


def test_infill_empty_prefix_is_just_bos(tok):
    lay = infill_layout(tok, CANVAS, "", "x", 1)
    assert lay.prompt_ids == [tok.bos_id]


def test_infill_long_suffix_is_cut_in_the_canvas_but_returned_whole(tok, ids):
    suffix = "ünïcödé → 🙂 " * 30  # far more than 64 tokens
    lay = infill_layout(tok, CANVAS, "préfixe ", suffix, 10, **ids)
    check_lengths(lay)
    assert lay.max_new_tokens == CANVAS and len(lay.pin_ids) == CANVAS
    assert lay.pin_ids[10:] == enc(tok, suffix)[: CANVAS - 10]
    gap = enc(tok, "hello")
    out = fill(lay, [gap])
    text, values, named = assemble(lay, out, tok)
    assert values == ["hello"] and named == {}
    assert text == "préfixe hello" + suffix
    assert text.encode() == ("préfixe hello" + suffix).encode()
    assert lay.slot_token_ids(out) == [gap + [0] * (10 - len(gap))]


def test_infill_gap_filling_the_canvas_pins_nothing(tok):
    lay = infill_layout(tok, CANVAS, "a", "b", CANVAS)
    assert lay.pin_mask == [False] * CANVAS and lay.max_new_tokens == CANVAS


@pytest.mark.parametrize("gap", [0, -1, CANVAS + 1, True, 2.0])
def test_infill_gap_out_of_range(tok, gap):
    with pytest.raises(InvalidArgument) as e:
        infill_layout(tok, CANVAS, "a", "b", gap)
    assert e.value.field == "gap_tokens"


def test_infill_pad_and_eos_in_the_gap_are_skipped(tok, ids):
    lay = infill_layout(tok, CANVAS, "x = ", ";", 6, **ids)
    out = fill(lay, [enc(tok, "42") + [ids["eos_id"]]])
    assert assemble(lay, out, tok)[0] == "x = 42;"


# ---------------------------------------------------------------------------------------------------
# Edit


def test_edit_pins_outside_spans_and_frees_spans(tok, ids):
    text = "The cat sat on the mat."
    # "cat" is [4, 7), "mat" is [19, 22); given out of order, one with an explicit length
    lay = edit_layout(tok, CANVAS, text, [Span(19, 22, 3), (4, 7, 0)], **ids)
    check_lengths(lay)
    parts = [enc(tok, "The "), enc(tok, " sat on the "), enc(tok, ".")]
    n_cat = len(enc(tok, "cat"))
    used = sum(map(len, parts)) + n_cat + 3
    a, b = len(parts[0]), len(parts[0]) + n_cat
    c, d = b + len(parts[1]), b + len(parts[1]) + 3
    assert lay.segments == [LiteralSegment("The "), Slot(a, b, 1), LiteralSegment(" sat on the "), Slot(c, d, 0),
                            LiteralSegment(".")]
    assert lay.pin_ids == (parts[0] + [0] * n_cat + parts[1] + [0] * 3 + parts[2] + [ids["eos_id"]]
                           + [ids["pad_id"]] * (CANVAS - used - 1))
    free = set(range(a, b)) | set(range(c, d))
    assert lay.pin_mask == [i not in free for i in range(CANVAS)]
    assert lay.constraint_ids == [L.TEXT if i in free else L.FREE for i in range(CANVAS)]
    assert lay.max_new_tokens == CANVAS
    assert lay.prompt_ids == [tok.bos_id]


def test_edit_instruction_is_a_user_turn(tok, ids):
    lay = edit_layout(tok, CANVAS, "abc", [(0, 1, 0)], "make it louder", **ids)
    assert lay.prompt_ids == tok.chat_prompt([("user", "make it louder")])


def test_edit_reassembles_verbatim_with_replacements_in_request_order(tok, ids):
    text = "¡Hola, señor Müller! 🙂\r\n tab\there"
    spans = [(21, 22, 2), (1, 5, 8)]  # the emoji, then "Hola"
    lay = edit_layout(tok, CANVAS, text, spans, **ids)
    out = fill(lay, [enc(tok, "ok"), enc(tok, "Adiós")])
    full, values, named = assemble(lay, out, tok)
    assert values == ["ok", "Adiós"] and named == {}
    assert full == "¡Adiós, señor Müller! ok\r\n tab\there"


def test_edit_zero_width_span_inserts_and_length_zero_is_at_least_one(tok, ids):
    lay = edit_layout(tok, CANVAS, "ab", [(1, 1, 0)], **ids)
    slot = lay.slots[0]
    assert slot.end - slot.start == 1
    full, _, _ = assemble(lay, fill(lay, [enc(tok, "X")]), tok)
    assert full == "aXb"


def test_edit_whole_canvas_has_no_room_for_eos(tok, ids):
    text = "abc"
    lay = edit_layout(tok, CANVAS, text, [(0, 3, CANVAS)], **ids)
    assert lay.pin_mask == [False] * CANVAS and lay.max_new_tokens == CANVAS


@pytest.mark.parametrize(
    "spans, field",
    [
        ([], "editable"),
        ([(0, 3, 0), (2, 5, 0)], "editable"),
        ([(-1, 2, 0)], "editable[0].start"),
        ([(0, 2, 0), (4, 99, 0)], "editable[1].end"),
        ([(3, 2, 0)], "editable[0].end"),
        ([(0, 2, -1)], "editable[0].length_tokens"),
        ([(0, 2, CANVAS + 1)], "editable[0].length_tokens"),
        ([(0, 2, 40), (3, 5, 40)], "text"),
        ([("0", 2, 0)], "editable[0].start"),
        ([(1,)], "editable[0]"),
    ],
)
def test_edit_errors_name_fields(tok, ids, spans, field):
    with pytest.raises(InvalidArgument) as e:
        edit_layout(tok, CANVAS, "hello world", spans, **ids)
    assert e.value.field == field


def test_edit_text_longer_than_canvas(tok, ids):
    with pytest.raises(InvalidArgument) as e:
        edit_layout(tok, CANVAS, "word " * 100, [(0, 4, 0)], **ids)
    assert e.value.field == "text" and "64" in e.value.detail


# ---------------------------------------------------------------------------------------------------
# Skeleton parsing

SKELETON = '{"name": "{{name:string:6}}", "age": {{age:number:2}}, "bio": "{{string:4}}"}'


def test_parse_json_skeleton():
    assert parse_skeleton(SKELETON) == [
        '{"name": "', Hole("name", "string", 6), '", "age": ', Hole("age", "number", 2), ', "bio": "',
        Hole(None, "string", 4), '"}',
    ]
    assert parse_skeleton(SKELETON)[1].offset == SKELETON.index("{{name")


def test_parse_escapes_and_plain_braces():
    assert parse_skeleton("a {{{{b}} {x} }}") == ["a {{b}} {x} }}"]
    assert parse_skeleton("{{{{{{text:3}}") == ["{{", Hole(None, "text", 3)]
    assert parse_skeleton('{"a": {"b": {{n:number:1}}}}') == ['{"a": {"b": ', Hole("n", "number", 1), "}}"]
    assert parse_skeleton("{{ k : text : 2 }}") == [Hole("k", "text", 2)]
    assert parse_skeleton("") == []


@pytest.mark.parametrize(
    "skeleton, offset",
    [
        ("ab {{text:3", 3),
        ("ab {{text}}", 3),
        ("x{{a:b:c:d}}", 1),
        ("{{name:float:3}}", 0),
        ("..{{text:0}}", 2),
        ("..{{text:-1}}", 2),
        ("..{{text:x}}", 2),
        ("{{{{ {{:text:2}}", 5),
    ],
)
def test_parse_errors_name_skeleton_and_offset(skeleton, offset):
    with pytest.raises(InvalidArgument) as e:
        parse_skeleton(skeleton)
    assert e.value.field == "skeleton" and f"offset {offset}" in e.value.detail


# ---------------------------------------------------------------------------------------------------
# Template


def test_template_classes_pins_and_json_assembly(tok, ids):
    lay = template_layout(tok, CANVAS, SKELETON, **ids)
    check_lengths(lay)
    lits = ['{"name": "', '", "age": ', ', "bio": "', '"}']
    lit_ids = [enc(tok, s) for s in lits]
    expect_classes: list[int] = []
    expect_pins: list[int] = []
    for lit, hole in zip(lit_ids, [[L.JSON_STRING] * 6, [L.NUMBER_FIRST, L.NUMBER_REST], [L.JSON_STRING] * 4, []]):
        expect_pins += lit + [0] * len(hole)
        expect_classes += [L.FREE] * len(lit) + hole
    used = len(expect_pins)
    expect_pins += [ids["eos_id"]] + [ids["pad_id"]] * (CANVAS - used - 1)
    assert lay.pin_ids == expect_pins
    assert lay.constraint_ids == expect_classes + [L.FREE] * (CANVAS - used)
    assert lay.pin_mask == [c == L.FREE for c in lay.constraint_ids]
    assert [s.type for s in lay.slots] == ["string", "number", "string"]
    assert lay.prompt_ids == [tok.bos_id]

    # digits in the number hole (one of them a pad: the model ended it early), words in the strings
    out = fill(lay, [enc(tok, "Ada L"), [22, 30], enc(tok, "math")])
    text, values, named = assemble(lay, out, tok)
    assert json.loads(text) == {"name": "Ada L", "age": 19, "bio": "math"}
    assert values == ["Ada L", "19", "math"] and named == {"name": "Ada L", "age": "19"}
    out = fill(lay, [enc(tok, "Ada"), [24, ids["pad_id"]], []])
    assert json.loads(assemble(lay, out, tok)[0]) == {"name": "Ada", "age": 3, "bio": ""}


def test_template_from_parts_keeps_unicode_literals_verbatim(tok, ids):
    parts = ["| naïve 🙂 |", Hole("a", "text", 3), "|\n", Hole("", 3, 2), Hole("b", 2, 1)]  # proto enum types
    lay = template_layout(tok, CANVAS, parts, "fill the table", **ids)
    assert lay.prompt_ids == tok.chat_prompt([("user", "fill the table")])
    assert [(s.name, s.type) for s in lay.slots] == [("a", "text"), (None, "number"), ("b", "string")]
    out = fill(lay, [enc(tok, "xyz"), [23], enc(tok, "q")])
    text, values, named = assemble(lay, out, tok)
    assert text == "| naïve 🙂 |xyz|\n2q" and values == ["xyz", "2", "q"] and named == {"a": "xyz", "b": "q"}


@pytest.mark.parametrize(
    "parts, field",
    [
        (["a", Hole("x", "float", 2)], "parts[1].hole.type"),
        (["a", Hole("x", "text", 0)], "parts[1].hole.length_tokens"),
        ([Hole("x", "text", CANVAS + 1)], "parts[0].hole.length_tokens"),
        ([Hole("x", "text", 1), "-", Hole("x", "number", 1)], "parts[2].hole.name"),
        (["a", 5], "parts[1]"),
        (["only literals"], "parts"),
        ([], "parts"),
        ([Hole("x", "text", 40), Hole("y", "text", 30)], "parts"),
    ],
)
def test_template_part_errors_name_fields(tok, ids, parts, field):
    with pytest.raises(InvalidArgument) as e:
        template_layout(tok, CANVAS, parts, **ids)
    assert e.value.field == field


@pytest.mark.parametrize(
    "skeleton, needle",
    [
        ("{{a:text:2}} {{a:text:2}}", "offset 13"),
        ("{{text:65}}", "offset 0"),
        ("{{text:40}}{{text:30}}", "needs 70 tokens"),
        ("no holes", "no holes"),
        ("{{text:2", "offset 0"),
    ],
)
def test_template_skeleton_errors_name_skeleton(tok, ids, skeleton, needle):
    with pytest.raises(InvalidArgument) as e:
        template_layout(tok, CANVAS, skeleton, **ids)
    assert e.value.field == "skeleton" and needle in e.value.detail


def test_template_exactly_filling_the_canvas(tok, ids):
    lay = template_layout(tok, CANVAS, "{{text:60}}{{number:4}}", **ids)
    assert lay.pin_mask == [False] * CANVAS and lay.max_new_tokens == CANVAS
    assert lay.constraint_ids[60:] == [L.NUMBER_FIRST] + [L.NUMBER_REST] * 3


def test_one_token_number_hole_may_be_zero(tok, ids):
    lay = template_layout(tok, CANVAS, '{"n": {{n:number:1}}}', **ids)
    assert [c for c in lay.constraint_ids if c != L.FREE] == [L.NUMBER_WHOLE]


# ---------------------------------------------------------------------------------------------------
# Module hygiene


def test_classes_mirror_the_sampler():
    constraints = pytest.importorskip("service.sampler.constraints")
    for name in ("FREE", "TEXT", "JSON_STRING", "NUMBER_FIRST", "NUMBER_REST", "NUMBER_WHOLE"):
        assert getattr(L, name) == getattr(constraints, name), name


def test_front_layout_and_tokenizer_load_without_torch():
    code = (
        "import sys\n"
        "from service.request.layout import infill_layout\n"
        "from service.text.tokenizer import load_tokenizer\n"
        "from service.model.config import read_config\n"
        f"tok = load_tokenizer({str(ASSETS)!r}); read_config({str(ASSETS)!r})\n"
        "infill_layout(tok, 64, 'a', 'b', 3)\n"
        "assert 'torch' not in sys.modules and 'grpc' not in sys.modules, 'heavy import'\n"
    )
    root = Path(__file__).resolve().parents[3]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
