"""Text <-> ids with the checkpoint's `tokenizer.json` (the `tokenizers` library)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from service.errors import CheckpointError

# Gemma chat format: <bos><|turn>user\n…<turn|>\n<|turn>model\n
TURN_OPEN, TURN_CLOSE = "<|turn>", "<turn|>"


class Tokenizer:
    def __init__(self, path: Path, bos_id: int) -> None:
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the library raises plain Exception subclasses
            raise CheckpointError(f"tokenizer.json cannot be loaded: {e}") from None
        self.bos_id = bos_id
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def chat_prompt(self, messages: list[tuple[str, str]]) -> list[int]:
        """Gemma turn format over (role, content) pairs, ending with an open model turn."""
        text = "".join(f"{TURN_OPEN}{role}\n{content}{TURN_CLOSE}\n" for role, content in messages)
        return self.encode(text + f"{TURN_OPEN}model\n")


def load_tokenizer(checkpoint_dir: Path, bos_id: int = 2) -> Tokenizer | None:
    path = Path(checkpoint_dir) / "tokenizer.json"
    return Tokenizer(path, bos_id) if path.is_file() else None
