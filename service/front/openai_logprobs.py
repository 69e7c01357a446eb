"""Log-probabilities in OpenAI's shapes: a completion choice's `logprobs` and a chat choice's `logprobs.content`.

One entry per returned token, pad excluded (the tokens `completion_tokens` counts); a stream's chunk carries its
own tokens' entries. The values are the engine's (docs/api.md, "Log-probabilities").
"""

from __future__ import annotations

import codecs
import math
from functools import lru_cache

from service.logprobs import Logprobs
from service.text.tokenizer import Tokenizer

FLOOR = -9999.0  # an id of probability 0 (a token class or top_k excludes it), as vLLM writes -inf: JSON has no inf


def finite(v: float) -> float:
    return v if math.isfinite(v) else FLOOR


class TokenTexts:
    """Each id's text (OpenAI's `token`), its bytes, and the characters it adds to a choice's text."""

    def __init__(self, tokenizer: Tokenizer | None, pad_id: int) -> None:
        self.tok = tokenizer
        self.pad_id = pad_id
        self.special = tokenizer.special_ids() if tokenizer is not None else set()
        self.bytes = lru_cache(maxsize=65536)(self._bytes)

    def _bytes(self, token_id: int) -> bytes:
        return self.tok.token_bytes(token_id) if self.tok is not None else b""

    def text(self, token_id: int) -> str:
        """The token's text; a token that is part of a character is "bytes:\\xNN..." as OpenAI writes it."""
        raw = self.bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class Offsets:
    """Character offsets of a choice's tokens in its text (a stream's chunks continue where the last ended)."""

    def __init__(self, texts: TokenTexts) -> None:
        self.texts = texts
        self.chars = 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")  # a split character counts once, whole

    def next(self, token_id: int) -> int:
        """This token's offset; then advance past it (special tokens write no text)."""
        at = self.chars
        if token_id not in self.texts.special:
            self.chars += len(self._utf8.decode(self.texts.bytes(token_id)))
        return at


def _kept(ids: list[int], lp: Logprobs, pad_id: int) -> list[int]:
    """Positions of the returned tokens (pad excluded)."""
    return [k for k in range(min(len(ids), len(lp))) if ids[k] != pad_id]


def completion_logprobs(ids: list[int], lp: Logprobs, texts: TokenTexts, offsets: Offsets) -> dict:
    """openai.types.completion_choice.Logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    kept = _kept(ids, lp, texts.pad_id)
    return {
        "tokens": [texts.text(ids[k]) for k in kept],
        "token_logprobs": [finite(lp.token[k]) for k in kept],
        "top_logprobs": [{texts.text(t): finite(v) for t, v in zip(lp.top_ids[k], lp.top[k])} for k in kept],
        "text_offset": [offsets.next(ids[k]) for k in kept],
    }


def chat_logprobs(ids: list[int], lp: Logprobs, texts: TokenTexts) -> dict:
    """openai.types.chat.chat_completion.ChoiceLogprobs: content, one entry per token with its alternatives."""

    def entry(token_id: int, value: float) -> dict:
        return {"token": texts.text(token_id), "logprob": finite(value), "bytes": list(texts.bytes(token_id))}

    return {"content": [{**entry(ids[k], lp.token[k]),
                         "top_logprobs": [entry(t, v) for t, v in zip(lp.top_ids[k], lp.top[k])]}
                        for k in _kept(ids, lp, texts.pad_id)],
            "refusal": None}


def echoed_logprobs(ids: list[int], lp: Logprobs | None, texts: TokenTexts, offsets: Offsets) -> dict:
    """A prompt's entries in a completion's logprobs (echo): ids [n], lp the scored log-probs of ids[1:] (None when
    n is 1). The first token has no log-prob (null), as OpenAI writes it."""
    values = [None] + [finite(v) for v in lp.token] if lp is not None else [None]
    tops = [None] + [{texts.text(t): finite(v) for t, v in zip(a, b)} for a, b in zip(lp.top_ids, lp.top)] \
        if lp is not None else [None]
    return {"tokens": [texts.text(t) for t in ids], "token_logprobs": values, "top_logprobs": tops,
            "text_offset": [offsets.next(t) for t in ids]}


def joined(first: dict, then: dict | None) -> dict:
    """Two completion logprobs objects, one after the other."""
    return first if then is None else {k: first[k] + then[k] for k in first}
