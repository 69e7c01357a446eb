"""Text <-> ids with the checkpoint's `tokenizer.json` (the `tokenizers` library)."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders

from service.errors import CheckpointError, InvalidArgument

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte tokens (Gemma's tokenizer)


@lru_cache(maxsize=1)
def _byte_level_bytes() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character each byte is written as -> the byte."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: b for b in visible}, 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = 256 + extra, extra + 1
    return {chr(c): b for b, c in chars.items()}


# Gemma chat format: <bos><|turn>user\n…<turn|>\n<|turn>model\n
TURN_OPEN, TURN_CLOSE = "<|turn>", "<turn|>"


class Tokenizer:
    def __init__(self, path: Path, bos_id: int, chat_template: str | None = None) -> None:
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the library raises plain Exception subclasses
            raise CheckpointError(f"tokenizer.json cannot be loaded: {e}") from None
        self.bos_id = bos_id
        self.vocab_size = self._tok.get_vocab_size()
        self.chat_template = chat_template
        self._template = None  # compiled on first use, once

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id stands for (a byte token's byte, part of a character perhaps; a special token's name)."""
        piece = self._tok.id_to_token(token_id) or ""
        if m := _BYTE_FALLBACK.fullmatch(piece):
            return bytes([int(m.group(1), 16)])
        table = _byte_level_bytes()
        if isinstance(self._tok.decoder, decoders.ByteLevel) and all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        return self.decode([token_id], skip_special=False).encode("utf-8")

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def special_ids(self) -> set[int]:
        """Ids of the added tokens marked special (pad, eos, bos, `<|turn>`, ...)."""
        return {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def longest_token_bytes(self) -> int:
        """The longest vocabulary entry in UTF-8 bytes (as stored: a bound on the text one token covers)."""
        return max((len(t.encode("utf-8")) for t in self._tok.get_vocab()), default=1)

    def token_texts(self) -> list[str]:
        """Every id decoded on its own, special tokens kept: entry i is id i's text."""
        return self._tok.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=False)

    def _compiled(self):
        if self._template is None:
            self._template = _compile(self.chat_template)
        return self._template

    def chat_prompt(self, messages: list[tuple[str, str]], extras: list[dict] | None = None) -> list[int]:
        """The checkpoint's chat template when it has one, else the Gemma turn format; ends with an open
        model turn. (role, content) pairs in order; `extras`: each message's other fields (`tool_calls`,
        `tool_call_id`, `name`), given to the template as they are. The Gemma format writes a turn's
        `tool_calls` after its content as JSON."""
        extras = extras or [{} for _ in messages]
        if self.chat_template is None:
            text = "".join(f"{TURN_OPEN}{role}\n{content}{_calls_text(x)}{TURN_CLOSE}\n"
                           for (role, content), x in zip(messages, extras))
            return self.encode(text + f"{TURN_OPEN}model\n")
        bos = self._tok.id_to_token(self.bos_id) or ""
        try:
            text = self._compiled().render(messages=[{**x, "role": r, "content": c} for (r, c), x in zip(messages, extras)],
                                           add_generation_prompt=True, bos_token=bos)
        except _RefusedByTemplate as e:  # the template's own check of the conversation: the client's to fix
            raise InvalidArgument("messages", f"the chat template refused the conversation: {e}") from None
        except TemplateError as e:
            raise CheckpointError(f"the checkpoint's chat template failed: {e}") from None
        ids = self.encode(text, add_bos=False)
        return ids if ids[:1] == [self.bos_id] else [self.bos_id, *ids]


def _calls_text(extra: dict) -> str:
    calls = extra.get("tool_calls")
    return json.dumps({"tool_calls": calls}, ensure_ascii=False) if calls else ""


class _RefusedByTemplate(TemplateError):
    """Raised by a template's `raise_exception(message)`, as transformers' chat templates call it."""


def _raise_exception(message: str) -> None:
    raise _RefusedByTemplate(str(message)[:500])


def _compile(template: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def load_chat_template(checkpoint_dir: Path) -> str | None:
    """chat_template.jinja, or tokenizer_config.json's "chat_template", as transformers saves them."""
    jinja = Path(checkpoint_dir) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    cfg = Path(checkpoint_dir) / "tokenizer_config.json"
    if cfg.is_file():
        try:
            template = json.loads(cfg.read_text()).get("chat_template")
        except (OSError, ValueError, AttributeError):
            raise CheckpointError("tokenizer_config.json is not valid JSON") from None
        return template if isinstance(template, str) else None
    return None


def load_tokenizer(checkpoint_dir: Path, bos_id: int = 2) -> Tokenizer | None:
    path = Path(checkpoint_dir) / "tokenizer.json"
    return Tokenizer(path, bos_id, load_chat_template(checkpoint_dir)) if path.is_file() else None
