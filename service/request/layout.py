"""Canvas layouts for Infill, Edit and Template, and reassembly of their results.

Pure logic over token ids: no gRPC, no torch. A layout says what the backend gets (prompt, pins,
per-position token classes, max_new_tokens) and how to rebuild the answer: literal text always comes
back from the request's own strings, byte-exact; only the generated slots are decoded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from service.errors import InvalidArgument
from service.text.token_classes import (  # constraint_ids
    FREE,
    JSON_STRING,
    NUMBER_FIRST,
    NUMBER_REST,
    NUMBER_WHOLE,
    TEXT,
)

if TYPE_CHECKING:
    from service.text.tokenizer import Tokenizer

HOLE_TYPES = ("text", "string", "number")
# diffusiongemma.v1.HoleType enum values -> hole type names (UNSPECIFIED is text).
HOLE_TYPE_BY_ENUM = {0: "text", 1: "text", 2: "string", 3: "number"}


@dataclass(frozen=True)
class Hole:
    """A template hole: `length_tokens` generated tokens of `type` (text, string or number)."""

    name: str | None
    type: str | int  # a name from HOLE_TYPES, or a diffusiongemma.v1.HoleType value
    length_tokens: int
    # Character offset in the skeleton it was parsed from (for error messages); None for proto parts.
    offset: int | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Span:
    """An editable span of the text in Unicode code points [start, end); 0 tokens = as many as it has now."""

    start: int
    end: int
    length_tokens: int = 0


@dataclass(frozen=True)
class LiteralSegment:
    """Text returned verbatim from the request."""

    text: str


@dataclass(frozen=True)
class Slot:
    """Generated tokens at canvas positions [start, end). `index` is the value's place in the response
    (request order for Edit, skeleton order for Template); `type` is a hole type, or "free" (Infill's gap)."""

    start: int
    end: int
    index: int
    name: str | None = None
    type: str = "text"


Segment = LiteralSegment | Slot


@dataclass
class CanvasLayout:
    """What the backend gets, plus the ordered segments that rebuild the answer."""

    prompt_ids: list[int]
    pin_ids: list[int]  # first-canvas positions from 0; 0 where unpinned
    pin_mask: list[bool]
    constraint_ids: list[int]  # token class per first-canvas position
    max_new_tokens: int
    segments: list[Segment]
    skip_ids: frozenset[int] = frozenset()  # never part of a slot's text (pad, eos)
    choices: list[list[int]] = field(default_factory=list)  # the layout's own classes (NUM_CLASSES + j)

    @property
    def slots(self) -> list[Slot]:
        """The generated slots in value order."""
        return sorted((s for s in self.segments if isinstance(s, Slot)), key=lambda s: s.index)

    def slot_token_ids(self, output_ids: Sequence[int]) -> list[list[int]]:
        """Each slot's raw output ids (pad included), in value order."""
        return [list(output_ids[s.start:s.end]) for s in self.slots]


class _Canvas:
    """Builds the pin / constraint arrays position by position."""

    def __init__(self) -> None:
        self.pin_ids: list[int] = []
        self.pin_mask: list[bool] = []
        self.constraint_ids: list[int] = []

    def __len__(self) -> int:
        return len(self.pin_ids)

    def pin(self, ids: Sequence[int]) -> None:
        self.pin_ids.extend(ids)
        self.pin_mask.extend([True] * len(ids))
        self.constraint_ids.extend([FREE] * len(ids))

    def free(self, classes: Sequence[int]) -> None:
        self.pin_ids.extend([0] * len(classes))
        self.pin_mask.extend([False] * len(classes))
        self.constraint_ids.extend(classes)

    def finish_with_eos(self, canvas_length: int, eos_id: int, pad_id: int) -> None:
        """One pinned EOS after the content, then pad to the end of the canvas, as far as there is room."""
        if len(self) < canvas_length:
            self.pin([eos_id])
            self.pin([pad_id] * (canvas_length - len(self)))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_canvas_length(canvas_length: int) -> None:
    if not _is_int(canvas_length) or canvas_length < 1:
        raise ValueError(f"canvas_length must be a positive int, got {canvas_length!r}")


def _skip_ids(*ids: int | None) -> frozenset[int]:
    return frozenset(i for i in ids if i is not None)


# ---------------------------------------------------------------------------------------------------
# Infill


def infill_layout(
    tok: Tokenizer,
    canvas_length: int,
    prefix: str,
    suffix: str,
    gap_tokens: int,
    *,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> CanvasLayout:
    """Prompt = BOS + prefix; canvas = `gap_tokens` free positions, then as many suffix tokens as fit,
    pinned. The whole suffix comes back verbatim, even the part the model never sees."""
    _check_canvas_length(canvas_length)
    if not _is_int(gap_tokens) or not 1 <= gap_tokens <= canvas_length:
        raise InvalidArgument("gap_tokens", f"must be between 1 and the canvas length {canvas_length}, "
                                            f"got {gap_tokens}")
    prompt = tok.encode(prefix, add_bos=True) if prefix else [tok.bos_id]
    suffix_ids = tok.encode(suffix, add_bos=False) if suffix else []  # on its own, not joined to the gap
    canvas = _Canvas()
    canvas.free([FREE] * gap_tokens)
    canvas.pin(suffix_ids[: canvas_length - gap_tokens])
    segments: list[Segment] = [LiteralSegment(prefix), Slot(0, gap_tokens, 0, None, "free"), LiteralSegment(suffix)]
    return CanvasLayout(prompt, canvas.pin_ids, canvas.pin_mask, canvas.constraint_ids, len(canvas),
                        segments, _skip_ids(eos_id, pad_id))


# ---------------------------------------------------------------------------------------------------
# Edit


def _span_fields(span: Any) -> tuple[Any, Any, Any]:
    """(start, end, length_tokens) from a Span, a proto Span or a 2/3-tuple."""
    if hasattr(span, "start"):
        return span.start, span.end, getattr(span, "length_tokens", 0)
    start, end, *rest = span
    return start, end, (rest[0] if rest else 0)


def _validated_spans(text: str, spans: Sequence[Any]) -> list[tuple[int, int, int, int]]:
    """(start, end, length_tokens, request index), sorted by position; raises on bad or overlapping spans."""
    if not spans:
        raise InvalidArgument("editable", "needs at least one span")
    n = len(text)
    out = []
    for i, span in enumerate(spans):
        try:
            start, end, length = _span_fields(span)
        except (TypeError, ValueError):
            raise InvalidArgument(f"editable[{i}]", "must be (start, end, length_tokens)") from None
        for name, v in (("start", start), ("end", end), ("length_tokens", length)):
            if not _is_int(v):
                raise InvalidArgument(f"editable[{i}].{name}", f"must be an integer, got {v!r}")
        if not 0 <= start <= n:
            raise InvalidArgument(f"editable[{i}].start", f"{start} is outside the text (0 to {n} code points)")
        if not start <= end <= n:
            raise InvalidArgument(f"editable[{i}].end", f"{end} must be between start {start} and the text's "
                                                        f"length {n} (code points)")
        if length < 0:
            raise InvalidArgument(f"editable[{i}].length_tokens", f"must be >= 0, got {length}")
        out.append((start, end, length, i))
    out.sort()
    for a, b in zip(out, out[1:]):
        if b[0] < a[1]:
            raise InvalidArgument("editable", f"spans {a[3]} [{a[0]}, {a[1]}) and {b[3]} [{b[0]}, {b[1]}) overlap")
    return out


def edit_layout(
    tok: Tokenizer,
    canvas_length: int,
    text: str,
    spans: Sequence[Span | tuple[int, int, int]],
    instruction: str = "",
    *,
    eos_id: int,
    pad_id: int,
) -> CanvasLayout:
    """Text outside the spans is tokenized segment by segment and pinned; each span becomes its
    `length_tokens` (0: as many as the span has now, at least 1) generated TEXT positions; then one
    pinned EOS and pad to the end of the canvas. Empty spans (start == end) insert."""
    _check_canvas_length(canvas_length)
    # (literal text, its ids) or (None, (request index, generated length)), in text order
    plan: list[tuple[str | None, Any]] = []
    pos = 0
    for start, end, length, index in _validated_spans(text, spans):
        if length > canvas_length:
            raise InvalidArgument(f"editable[{index}].length_tokens",
                                  f"{length} is more than the canvas holds ({canvas_length})")
        if text[pos:start]:
            plan.append((text[pos:start], tok.encode(text[pos:start], add_bos=False)))
        plan.append((None, (index, length or max(1, len(tok.encode(text[start:end], add_bos=False))))))
        pos = end
    if text[pos:]:
        plan.append((text[pos:], tok.encode(text[pos:], add_bos=False)))
    needed = sum(len(x) if lit is not None else x[1] for lit, x in plan)
    if needed > canvas_length:
        raise InvalidArgument("text", f"the text and its spans need {needed} tokens; the canvas holds {canvas_length}")
    canvas = _Canvas()
    segments: list[Segment] = []
    for lit, x in plan:
        if lit is not None:
            segments.append(LiteralSegment(lit))
            canvas.pin(x)
        else:
            index, length = x
            segments.append(Slot(len(canvas), len(canvas) + length, index))
            canvas.free([TEXT] * length)
    canvas.finish_with_eos(canvas_length, eos_id, pad_id)
    prompt = tok.chat_prompt([("user", instruction)]) if instruction else [tok.bos_id]
    return CanvasLayout(prompt, canvas.pin_ids, canvas.pin_mask, canvas.constraint_ids, len(canvas),
                        segments, _skip_ids(eos_id, pad_id))


# ---------------------------------------------------------------------------------------------------
# Template

_LENGTH = re.compile(r"[0-9]+")
HOLE_OPEN, HOLE_CLOSE, ESCAPED_OPEN = "{{", "}}", "{{{{"


def _parse_hole(body: str, offset: int) -> Hole:
    fields = [f.strip() for f in body.split(":")]
    where = f"at offset {offset}"
    if len(fields) not in (2, 3):
        raise InvalidArgument("skeleton", f"{where}: a hole is {{{{type:length}}}} or {{{{name:type:length}}}}, "
                                          f"got {{{{{body}}}}} (write {{{{{{{{ for a literal {{{{)")
    name = fields[0] if len(fields) == 3 else None
    type_, length = fields[-2], fields[-1]
    if name is not None and not name:
        raise InvalidArgument("skeleton", f"{where}: the hole's name is empty")
    if type_ not in HOLE_TYPES:
        raise InvalidArgument("skeleton", f"{where}: hole type {type_!r} is not text, string or number")
    if not _LENGTH.fullmatch(length) or int(length) < 1:
        raise InvalidArgument("skeleton", f"{where}: hole length {length!r} must be a whole number >= 1")
    return Hole(name, type_, int(length), offset)


def parse_skeleton(text: str) -> list[str | Hole]:
    """Literal strings and Holes, in order. Holes are {{type:length}} or {{name:type:length}}; "{{{{" is
    a literal "{{". Errors name the field `skeleton` and give the character offset."""
    parts: list[str | Hole] = []
    literal: list[str] = []
    i = 0
    while True:
        j = text.find(HOLE_OPEN, i)
        if j < 0:
            literal.append(text[i:])
            break
        literal.append(text[i:j])
        if text.startswith(ESCAPED_OPEN, j):
            literal.append(HOLE_OPEN)
            i = j + len(ESCAPED_OPEN)
            continue
        close = text.find(HOLE_CLOSE, j + len(HOLE_OPEN))
        if close < 0:
            raise InvalidArgument("skeleton", f"at offset {j}: {{{{ opens a hole that is never closed "
                                              f"(write {{{{{{{{ for a literal {{{{)")
        if "".join(literal):
            parts.append("".join(literal))
        literal = []
        parts.append(_parse_hole(text[j + len(HOLE_OPEN):close], j))
        i = close + len(HOLE_CLOSE)
    if "".join(literal):
        parts.append("".join(literal))
    return parts


def _hole_classes(type_: str, length: int) -> list[int]:
    if type_ == "string":
        return [JSON_STRING] * length
    if type_ == "number":  # one token may be 0; a longer number has no leading zero
        return [NUMBER_WHOLE] if length == 1 else [NUMBER_FIRST] + [NUMBER_REST] * (length - 1)
    return [TEXT] * length


def template_layout(
    tok: Tokenizer,
    canvas_length: int,
    parts: str | Sequence[str | Hole],
    instruction: str = "",
    *,
    eos_id: int,
    pad_id: int,
) -> CanvasLayout:
    """`parts` is a skeleton string (parsed with parse_skeleton; errors name `skeleton`) or a list of
    literal strings and Holes (errors name `parts[i]...`). Literals are tokenized one by one and pinned;
    holes get their type's token classes; then one pinned EOS and pad to the end of the canvas."""
    _check_canvas_length(canvas_length)
    from_skeleton = isinstance(parts, str)
    items = parse_skeleton(parts) if from_skeleton else list(parts)
    top = "skeleton" if from_skeleton else "parts"

    def where(i: int, hole: Hole | None, sub: str) -> str:
        """The field to blame for part i."""
        return "skeleton" if from_skeleton else f"parts[{i}]" + (f".hole.{sub}" if hole is not None and sub else "")

    def at(hole: Hole) -> str:
        return f"the hole at offset {hole.offset}: " if from_skeleton and hole.offset is not None else ""

    canvas = _Canvas()
    segments: list[Segment] = []
    names: set[str] = set()
    n_holes = needed = 0
    overflow = False
    for i, part in enumerate(items):
        if isinstance(part, str):
            if part:
                ids = tok.encode(part, add_bos=False)
                needed += len(ids)
                if not overflow and len(canvas) + len(ids) <= canvas_length:
                    segments.append(LiteralSegment(part))
                    canvas.pin(ids)
                else:
                    overflow = True
            continue
        if not isinstance(part, Hole):
            raise InvalidArgument(where(i, None, ""), "must be a literal string or a hole")
        type_ = HOLE_TYPE_BY_ENUM.get(part.type) if _is_int(part.type) else part.type
        if type_ not in HOLE_TYPES:
            raise InvalidArgument(where(i, part, "type"), f"{at(part)}type {part.type!r} is not text, string or number")
        length = part.length_tokens
        if not _is_int(length) or not 1 <= length <= canvas_length:
            raise InvalidArgument(where(i, part, "length_tokens"),
                                  f"{at(part)}length_tokens must be between 1 and the canvas length {canvas_length}, "
                                  f"got {length}")
        name = part.name or None
        if name is not None:
            if name in names:
                raise InvalidArgument(where(i, part, "name"), f"{at(part)}the hole name {name!r} is used twice")
            names.add(name)
        if not overflow and len(canvas) + length <= canvas_length:
            segments.append(Slot(len(canvas), len(canvas) + length, n_holes, name, type_))
            canvas.free(_hole_classes(type_, length))
        else:  # only counted from here on, for the error below
            overflow = True
        needed += length
        n_holes += 1
    if n_holes == 0:
        raise InvalidArgument(top, "has no holes to fill")
    if overflow:
        raise InvalidArgument(top, f"needs {needed} tokens (literals and holes); the canvas holds {canvas_length}")
    canvas.finish_with_eos(canvas_length, eos_id, pad_id)
    prompt = tok.chat_prompt([("user", instruction)]) if instruction else [tok.bos_id]
    return CanvasLayout(prompt, canvas.pin_ids, canvas.pin_mask, canvas.constraint_ids, len(canvas),
                        segments, _skip_ids(eos_id, pad_id))


# ---------------------------------------------------------------------------------------------------
# Reassembly


def assemble(layout: CanvasLayout, output_ids: Sequence[int], tok: Tokenizer) -> tuple[str, list[str], dict[str, str]]:
    """(full text, each slot's text in value order, named slots' text). Literals come from the layout
    verbatim; slots are decoded from their own token range with pad and special tokens skipped."""
    pieces: list[str] = []
    values: dict[int, str] = {}
    named: dict[str, str] = {}
    for seg in layout.segments:
        if isinstance(seg, LiteralSegment):
            pieces.append(seg.text)
            continue
        ids = [int(t) for t in output_ids[seg.start:seg.end] if int(t) not in layout.skip_ids]
        value = tok.decode(ids, skip_special=True) if ids else ""
        pieces.append(value)
        values[seg.index] = value
        if seg.name is not None:
            named[seg.name] = value
    return "".join(pieces), [values[k] for k in sorted(values)], named
