"""Structured output: a JSON Schema compiled into a pinned canvas with typed holes, and the document back.

The schema's fixed text (braces, keys, quotes, commas) is pinned; each value is a hole whose token classes
admit only what that value may be (service/text/token_classes.py), so the document parses every time:
- a string is a hole of JSON string pieces, pad allowed after `minLength` tokens (a shorter value), the
  value cut to `maxLength` characters;
- an integer or number is a hole of digits (pad allowed after the first): a whole number >= 0, clamped to
  `minimum`/`maximum`;
- a boolean or an enum is a choice: each position allows the options' tokens there (the request's own
  token classes); when the positions mix options, the option agreeing with most of them is returned;
- objects write every property, in the schema's order; arrays write `minItems` items (at least one, at most
  `maxItems`); `anyOf`/`oneOf` and type lists take their first alternative that is not null; `$ref` to
  `#/$defs/...` or `#/definitions/...` is followed.
Anything else that constrains a value (`pattern`, `format`, `multipleOf`, ...) is refused naming it.
Pure logic over token ids, as service/request/layout.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from service.errors import InvalidArgument
from service.request.layout import CanvasLayout, LiteralSegment, Slot, _Canvas, _skip_ids
from service.text.token_classes import DIGITS_OR_PAD, JSON_STRING, JSON_STRING_OR_PAD, NUM_CLASSES, NUMBER_REST

if TYPE_CHECKING:
    from service.text.tokenizer import Tokenizer

DEFAULT_STRING_TOKENS = 16  # a string hole without maxLength (less when the document would not fit)
DEFAULT_NUMBER_TOKENS = 4  # a number hole without a maximum
MAX_NUMBER_TOKENS = 16
MAX_DEPTH = 16  # nested objects, arrays and $refs
# Keys that describe and do not constrain: accepted and ignored.
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                         "readOnly", "writeOnly", "$defs", "definitions", "strict", "nullable"})
ALLOWED = {
    "object": {"type", "properties", "required", "additionalProperties", "propertyOrdering"},
    "array": {"type", "items", "minItems", "maxItems"},
    "string": {"type", "minLength", "maxLength"},
    "integer": {"type", "minimum", "maximum"},
    "number": {"type", "minimum", "maximum"},
    "boolean": {"type"},
    "null": {"type"},
}


@dataclass(frozen=True)
class Value:
    """A hole of the document: what it holds and the schema path it came from (for errors)."""

    kind: str  # "string", "number" (integer or number) or "choice"
    path: str
    integer: bool = True
    min_length: int = 0
    max_length: int | None = None
    minimum: float | None = None
    maximum: float | None = None
    options: tuple[str, ...] = ()  # a choice's options, as JSON text


Item = str | Value


@dataclass
class Compiled:
    """A schema as document items (literal text and Values) in order."""

    items: list[Item] = field(default_factory=list)

    def lit(self, text: str) -> None:
        if self.items and isinstance(self.items[-1], str):
            self.items[-1] += text
        else:
            self.items.append(text)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Compiler:
    def __init__(self, root: dict, field: str) -> None:
        self.root = root
        self.field = field
        self.out = Compiled()

    def fail(self, path: str, why: str) -> InvalidArgument:
        return InvalidArgument(self.field + path, why)

    def resolve(self, node: Any, path: str, depth: int) -> tuple[dict, str]:
        """The node with its $ref followed (and its path)."""
        for _ in range(MAX_DEPTH):
            if not isinstance(node, dict):
                raise self.fail(path, "must be a JSON Schema object")
            ref = node.get("$ref")
            if ref is None:
                return node, path
            parts = ref.split("/") if isinstance(ref, str) else []
            if len(parts) != 3 or parts[0] != "#" or parts[1] not in ("$defs", "definitions"):
                raise self.fail(path + ".$ref", f"only local references to #/$defs/<name> are supported, got {ref!r}")
            target = self.root.get(parts[1], {})
            if not isinstance(target, dict) or parts[2] not in target:
                raise self.fail(path + ".$ref", f"{ref!r} names no definition")
            node, path = target[parts[2]], f".{parts[1]}.{parts[2]}"
        raise self.fail(path, f"references nest deeper than {MAX_DEPTH}")

    def node(self, node: Any, path: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise self.fail(path, f"nests deeper than {MAX_DEPTH}")
        node, path = self.resolve(node, path, depth)
        if "const" in node:
            self.out.lit(json.dumps(node["const"], ensure_ascii=False))
            return
        if "enum" in node:
            self.choice([json.dumps(v, ensure_ascii=False) for v in self._list(node, "enum", path)], path + ".enum")
            return
        for key in ("anyOf", "oneOf"):
            if key in node:
                alts = self._list(node, key, path)
                kept = [a for a in alts if not (isinstance(a, dict) and a.get("type") == "null")] or alts
                self.node(kept[0], f"{path}.{key}[{alts.index(kept[0])}]", depth + 1)
                return
        type_ = node.get("type")
        if isinstance(type_, list):
            type_ = next((t for t in type_ if t != "null"), "null")
        if type_ is None and "properties" in node:
            type_ = "object"
        if type_ not in ALLOWED:
            raise self.fail(path + ".type", "needs a type: object, array, string, integer, number, boolean or null"
                            if type_ is None else f"type {type_!r} is not supported")
        for key in node:
            if key not in ALLOWED[type_] and key not in ANNOTATIONS:
                raise self.fail(f"{path}.{key}", f"{key!r} is not supported for a {type_} (docs/api.md, "
                                                 f"\"Structured output\")")
        getattr(self, "t_" + type_)(node, path, depth)

    def _list(self, node: dict, key: str, path: str) -> list:
        v = node[key]
        if not isinstance(v, list) or not v:
            raise self.fail(f"{path}.{key}", "must be a non-empty list")
        return v

    def _count(self, node: dict, key: str, path: str) -> int | None:
        v = node.get(key)
        if v is None:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise self.fail(f"{path}.{key}", f"must be an integer >= 0, got {v!r}")
        return v

    def choice(self, options: list[str], path: str) -> None:
        if len(set(options)) == 1:
            self.out.lit(options[0])
        else:
            self.out.items.append(Value("choice", path, options=tuple(dict.fromkeys(options))))

    def t_object(self, node: dict, path: str, depth: int) -> None:
        props = node.get("properties", {})
        if not isinstance(props, dict):
            raise self.fail(path + ".properties", "must be an object")
        self.out.lit("{")
        for k, (name, sub) in enumerate(props.items()):
            self.out.lit((", " if k else "") + json.dumps(name, ensure_ascii=False) + ": ")
            self.node(sub, f"{path}.properties.{name}", depth + 1)
        self.out.lit("}")

    def t_array(self, node: dict, path: str, depth: int) -> None:
        lo, hi = self._count(node, "minItems", path), self._count(node, "maxItems", path)
        n = max(lo or 0, 1) if hi is None else min(max(lo or 0, 1), hi)
        if lo is not None and hi is not None and lo > hi:
            raise self.fail(path + ".minItems", f"{lo} is above maxItems {hi}")
        if n and "items" not in node:
            raise self.fail(path + ".items", "an array needs an items schema")
        self.out.lit("[")
        for i in range(n):
            if i:
                self.out.lit(", ")
            self.node(node["items"], f"{path}.items", depth + 1)
        self.out.lit("]")

    def t_string(self, node: dict, path: str, depth: int) -> None:
        lo, hi = self._count(node, "minLength", path) or 0, self._count(node, "maxLength", path)
        if hi is not None and lo > hi:
            raise self.fail(path + ".minLength", f"{lo} is above maxLength {hi}")
        self.out.lit('"')
        if hi != 0:
            self.out.items.append(Value("string", path, min_length=lo, max_length=hi))
        self.out.lit('"')

    def t_integer(self, node: dict, path: str, depth: int, integer: bool = True) -> None:
        bounds = []
        for key in ("minimum", "maximum"):
            v = node.get(key)
            if v is not None and not _number(v):
                raise self.fail(f"{path}.{key}", f"must be a finite number, got {v!r}")
            bounds.append(v)
        lo, hi = bounds
        if lo is not None and hi is not None and lo > hi:
            raise self.fail(path + ".minimum", f"{lo} is above maximum {hi}")
        if integer and lo is not None and hi is not None and math.ceil(lo) > math.floor(hi):
            raise self.fail(path + ".minimum", f"no integer lies in [{lo}, {hi}]")
        self.out.items.append(Value("number", path, integer=integer, minimum=lo, maximum=hi))

    def t_number(self, node: dict, path: str, depth: int) -> None:
        self.t_integer(node, path, depth, integer=False)

    def t_boolean(self, node: dict, path: str, depth: int) -> None:
        self.choice(["true", "false"], path)

    def t_null(self, node: dict, path: str, depth: int) -> None:
        self.out.lit("null")


def compile_schema(schema: Any, field: str) -> Compiled:
    """The document items of `schema`; errors name `field` plus the schema path of what is refused."""
    if not isinstance(schema, dict):
        raise InvalidArgument(field, "must be a JSON Schema object")
    c = _Compiler(schema, field)
    c.node(schema, "", 0)
    return c.out


# ---------------------------------------------------------------------------------------------------
# Layout


def _number_tokens(v: Value) -> int:
    """Digits a number hole holds at most (each token is one digit or more)."""
    if v.maximum is not None and v.maximum >= 0:
        return min(MAX_NUMBER_TOKENS, len(str(math.floor(v.maximum))))
    return DEFAULT_NUMBER_TOKENS


@dataclass
class Structured:
    """A document's canvas layout and its holes' Values by slot index."""

    layout: CanvasLayout
    values: list[Value]


def structured_layout(tok: "Tokenizer", canvas_length: int, prompt_ids: list[int], compiled: Compiled,
                      field: str, *, eos_id: int, pad_id: int, budget: int | None = None) -> Structured:
    """Literals tokenized one by one and pinned; each Value a hole (see the module's docstring); one pinned EOS
    and pad to the end of the canvas. The document and its EOS take at most `budget` positions (the canvas when
    None): strings without maxLength share what is left (up to DEFAULT_STRING_TOKENS each); a document that
    cannot fit is refused naming `field`."""
    budget = canvas_length if budget is None else min(budget, canvas_length)
    literal_ids = [tok.encode(x, add_bos=False) if isinstance(x, str) else None for x in compiled.items]
    options_ids = {id(v): [tok.encode(o, add_bos=False) for o in v.options]
                   for v in compiled.items if isinstance(v, Value) and v.kind == "choice"}

    def fixed_tokens(v: Value) -> int:
        if v.kind == "number":
            return _number_tokens(v)
        if v.kind == "choice":
            return max(len(ids) for ids in options_ids[id(v)])
        return max(1, v.min_length) if v.max_length is None else max(1, min(v.max_length, DEFAULT_STRING_TOKENS),
                                                                         v.min_length)

    values = [x for x in compiled.items if isinstance(x, Value)]
    if not values:
        raise InvalidArgument(field, "the schema leaves nothing to generate (every value is fixed)")
    flexible = [v for v in values if v.kind == "string" and v.max_length is None]
    needed = 1 + sum(len(ids) for ids in literal_ids if ids is not None) + sum(fixed_tokens(v) for v in values)
    share = DEFAULT_STRING_TOKENS
    if flexible:
        room = budget - needed + sum(fixed_tokens(v) for v in flexible)
        share = min(DEFAULT_STRING_TOKENS, room // len(flexible))
    sizes = {id(v): max(fixed_tokens(v), share) if v in flexible else fixed_tokens(v) for v in values}
    total = needed + sum(sizes[id(v)] - fixed_tokens(v) for v in values)
    if total > budget or (flexible and share < 1):
        where = "the canvas holds" if budget == canvas_length else "the request allows"
        raise InvalidArgument(field, f"the document needs at least {needed} tokens; {where} {budget}")
    canvas = _Canvas()
    segments = []
    sets: dict[tuple[int, ...], int] = {}  # choice set -> its index in the layout's choices
    for x, ids in zip(compiled.items, literal_ids):
        if ids is not None:
            segments.append(LiteralSegment(x))
            canvas.pin(ids)
            continue
        n = sizes[id(x)]
        segments.append(Slot(len(canvas), len(canvas) + n, len(segments), None, x.kind))
        if x.kind == "string":
            req = min(n, x.min_length)
            canvas.free([JSON_STRING] * req + [JSON_STRING_OR_PAD] * (n - req))
        elif x.kind == "number":
            canvas.free([NUMBER_REST] + [DIGITS_OR_PAD] * (n - 1))
        else:
            classes = []
            for p in range(n):
                allowed = tuple(sorted({ids[p] if p < len(ids) else pad_id for ids in options_ids[id(x)]}))
                classes.append(NUM_CLASSES + sets.setdefault(allowed, len(sets)))
            canvas.free(classes)
    canvas.finish_with_eos(canvas_length, eos_id, pad_id)
    slots = [s for s in segments if isinstance(s, Slot)]
    by_index = {s.index: v for s, v in zip(slots, values)}
    lay = CanvasLayout(prompt_ids, canvas.pin_ids, canvas.pin_mask, canvas.constraint_ids, len(canvas), segments,
                       _skip_ids(eos_id, pad_id), [list(s) for s in sets])
    return Structured(lay, [by_index[s.index] for s in lay.slots])


# ---------------------------------------------------------------------------------------------------
# The document back


def _clamp(x: int, v: Value) -> int | float:
    lo, hi = v.minimum, v.maximum
    if v.integer:
        lo = None if lo is None else math.ceil(lo)
        hi = None if hi is None else math.floor(hi)
    out: int | float = x
    if lo is not None and out < lo:
        out = lo
    if hi is not None and out > hi:
        out = hi
    return out


def _choose(ids: Sequence[int], options: list[list[int]], pad_id: int) -> int:
    """The option whose tokens agree with most positions of the hole (ties: the earlier positions decide)."""
    def agreement(k: int) -> tuple[int, list[bool]]:
        padded = list(options[k]) + [pad_id] * (len(ids) - len(options[k]))
        same = [a == b for a, b in zip(ids, padded)]
        return sum(same), same
    return max(range(len(options)), key=agreement)


def render(s: Structured, output_ids: Sequence[int], tok: "Tokenizer", pad_id: int) -> str:
    """The document: literals from the layout verbatim, each hole's value made valid for its schema."""
    slots = {slot.index: v for slot, v in zip(s.layout.slots, s.values)}
    pieces = []
    for seg in s.layout.segments:
        if isinstance(seg, LiteralSegment):
            pieces.append(seg.text)
            continue
        v = slots[seg.index]
        raw = [int(t) for t in output_ids[seg.start:seg.end]]
        kept = [t for t in raw if t not in s.layout.skip_ids]
        text = tok.decode(kept, skip_special=True) if kept else ""
        if v.kind == "string":
            text = text[: v.max_length] if v.max_length is not None else text
            pieces.append(json.dumps(text.ljust(v.min_length), ensure_ascii=False)[1:-1])
        elif v.kind == "number":
            digits = "".join(ch for ch in text if ch in "0123456789") or "0"
            pieces.append(json.dumps(_clamp(int(digits), v)))
        else:
            options = [tok.encode(o, add_bos=False) for o in v.options]
            pieces.append(v.options[_choose(raw, options, pad_id)])
    return "".join(pieces)
