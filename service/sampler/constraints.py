"""Per-position token classes for structured output: which ids a canvas position may take.

A request gives one class id per position of its first canvas; the engine masks the logits of every
constrained position to its class before sampling, entropy, argmax and self-conditioning see them.
Shapes: L = canvas length, V = vocabulary, C = NUM_CLASSES.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from service.errors import InvalidArgument
from service.text.token_classes import (  # noqa: F401  (re-exported: the engine's names for them)
    CLASS_NAMES,
    DIGITS_OR_PAD,
    FREE,
    JSON_STRING,
    JSON_STRING_OR_PAD,
    NUM_CLASSES,
    NUMBER_FIRST,
    NUMBER_REST,
    NUMBER_WHOLE,
    TEXT,
)

if TYPE_CHECKING:
    from service.text.tokenizer import Tokenizer

# What a disallowed logit becomes: finite, so entropy (p * log p with p = 0) stays 0, never NaN.
BLOCKED = torch.finfo(torch.float32).min

_CONTROL = re.compile("[\u0000-\u001f\u007f]")
_NUMBER_FIRST = re.compile("[1-9][0-9]*")
_NUMBER_REST = re.compile("[0-9]+")
_NUMBER_WHOLE = re.compile("0|[1-9][0-9]*")


def _json_string_ok(text: str) -> bool:
    return bool(text) and '"' not in text and "\\" not in text and _CONTROL.search(text) is None


def class_masks_from_texts(texts: list[str], special: Iterable[int], vocab_size: int,
                           pad_id: int | None = None) -> Tensor:
    """Allowed ids per class: bool [C, V]. texts[i] is id i decoded alone; ids past len(texts) are FREE only.

    Pieces that decode to partial UTF-8 (U+FFFD) are left out of JSON_STRING and the number classes. The
    *_OR_PAD classes are their piece class plus `pad_id` (none without it).
    """
    masks = torch.zeros(NUM_CLASSES, vocab_size, dtype=torch.bool)
    masks[FREE] = True
    n = min(len(texts), vocab_size)
    masks[TEXT, :n] = True
    whole = [t if "\ufffd" not in t else "" for t in texts[:n]]  # partial UTF-8 matches no class below
    # Python lists, one tensor write per class: item writes cost seconds on a 262k vocabulary
    masks[JSON_STRING, :n] = torch.tensor([_json_string_ok(t) for t in whole], dtype=torch.bool)
    for c, pattern in ((NUMBER_FIRST, _NUMBER_FIRST), (NUMBER_REST, _NUMBER_REST), (NUMBER_WHOLE, _NUMBER_WHOLE)):
        masks[c, :n] = torch.tensor([pattern.fullmatch(t) is not None for t in whole], dtype=torch.bool)
    ids = torch.tensor([i for i in set(special) if 0 <= i < vocab_size], dtype=torch.long)
    masks[FREE + 1 :, ids] = False  # special ids belong to no class but FREE
    masks[JSON_STRING_OR_PAD] = masks[JSON_STRING]
    masks[DIGITS_OR_PAD] = masks[NUMBER_REST]
    if pad_id is not None and 0 <= pad_id < vocab_size:
        masks[[JSON_STRING_OR_PAD, DIGITS_OR_PAD], pad_id] = True
    return masks


def build_class_masks(tokenizer: "Tokenizer", vocab_size: int, special: Iterable[int] = (),
                      pad_id: int | None = None) -> Tensor:
    """The class masks of a checkpoint: bool [C, V]. `special` adds ids to exclude (the engine's eos/pad/bos);
    `pad_id` is the one the *_OR_PAD classes allow."""
    return class_masks_from_texts(tokenizer.token_texts(), {*tokenizer.special_ids(), *special}, vocab_size, pad_id)


def choice_masks(choices: list[list[int]], vocab_size: int, device: torch.device | str = "cpu") -> Tensor:
    """A request's choice sets as class rows: bool [K, V], row j allowing the ids of choices[j]."""
    masks = torch.zeros(len(choices), vocab_size, dtype=torch.bool)
    for j, ids in enumerate(choices):
        masks[j, ids] = True
    return masks.to(device)


def check_classes(masks: Tensor, classes: Iterable[int]) -> None:
    """InvalidArgument("constraints") when a requested class allows no id of this vocabulary."""
    for c in sorted(set(classes)):
        if c < NUM_CLASSES and not bool(masks[c].any()):
            raise InvalidArgument("constraints", f"class {c} ({CLASS_NAMES[c]}) matches no token of this vocabulary")


def canvas_classes(constraints: list[int], length: int, pin_mask: Tensor | None = None) -> Tensor:
    """Class ids for a whole canvas: long [L]; FREE past the list's end and wherever a pin is (pins win)."""
    class_ids = torch.full((length,), FREE, dtype=torch.long)
    class_ids[: len(constraints)] = torch.tensor(constraints, dtype=torch.long)
    if pin_mask is not None:
        class_ids[pin_mask] = FREE
    return class_ids


def constrain_logits_(logits: Tensor, class_ids: Tensor, masks: Tensor) -> Tensor:
    """In place: logits [L, V] get BLOCKED wherever masks[class_ids[l]] disallows the id; returns logits.

    Only constrained rows are touched. class_ids: long [L] (on logits' device); masks: bool [C, V].
    """
    rows = (class_ids != FREE).nonzero().squeeze(-1)  # [R]
    if rows.numel():
        blocked = ~masks[class_ids[rows]]  # [R, V]
        logits[rows] = logits[rows].masked_fill_(blocked, BLOCKED)
    return logits


def constrain_logits(logits: Tensor, class_ids: Tensor, masks: Tensor) -> Tensor:
    """The same as `constrain_logits_` on a copy: logits [L, V] -> [L, V]."""
    return constrain_logits_(logits.clone(), class_ids, masks)
