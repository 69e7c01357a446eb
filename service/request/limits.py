"""The front's limits on one request, checked before anything is tokenized: the prompt's text in bytes, a
token estimate from it, and raw token ids by count. Both fronts (gRPC, HTTP) call these."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf.message import Message

from service.errors import InvalidArgument

DEFAULT_MAX_PROMPT_BYTES = 128 << 10
DEFAULT_MAX_PROMPT_TOKENS = 8192  # the engine's own limit (NIM_MAX_PROMPT_TOKENS)
NOT_PROMPT = ("request_id", "model")  # text fields of a request that are checked on their own, not tokenized


@dataclass(frozen=True)
class PromptLimits:
    max_bytes: int = DEFAULT_MAX_PROMPT_BYTES  # NIM_MAX_PROMPT_BYTES: UTF-8 bytes of a request's text fields
    max_tokens: int = DEFAULT_MAX_PROMPT_TOKENS  # NIM_MAX_PROMPT_TOKENS
    # the longest vocabulary entry in UTF-8 bytes: no token covers more text, so bytes / this is a lower
    # bound on the token count (1: the estimate is the byte count itself)
    max_token_bytes: int = 1

    def check_text(self, sizes: Mapping[str, int]) -> None:
        """`sizes`: each text field's UTF-8 bytes by field path. Refused (the largest field named) when the
        text is over the byte cap, or when it must tokenize to more than `max_tokens`."""
        total = sum(sizes.values())
        if not total:
            return
        field = max(sizes, key=lambda k: sizes[k])
        if total > self.max_bytes:
            raise InvalidArgument(field, f"the request's text is {total} bytes, over this server's limit of "
                                         f"{self.max_bytes} bytes")
        least = -(-total // max(1, self.max_token_bytes))
        if least > self.max_tokens:
            raise InvalidArgument(field, f"the request's text is at least {least} tokens, over this server's "
                                         f"limit of {self.max_tokens} prompt tokens")

    def check_ids(self, field: str, count: int) -> None:
        """Raw prompt ids: at most `max_tokens` of them."""
        if count > self.max_tokens:
            raise InvalidArgument(field, f"{count} ids, over this server's limit of {self.max_tokens} prompt tokens")

    def check_message(self, msg: Message) -> None:
        """A protobuf request: its serialized size bounds its text, so only a large one is walked."""
        size = msg.ByteSize()
        if size <= self.max_bytes and -(-size // max(1, self.max_token_bytes)) <= self.max_tokens:
            return
        self.check_text({k: n for k, n in text_sizes(msg).items() if k not in NOT_PROMPT})


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def utf8_sizes(texts: Mapping[str, str | None]) -> dict[str, int]:
    """{field path: UTF-8 bytes} of the given texts (None and empty ones left out)."""
    return {k: _utf8_len(v) for k, v in texts.items() if v}


def text_sizes(msg: Message, prefix: str = "") -> dict[str, int]:
    """Every set string field of `msg`, nested ones included, as {field path: UTF-8 bytes}."""
    out: dict[str, int] = {}
    for fd, value in msg.ListFields():
        path = prefix + fd.name
        repeated = fd.is_repeated
        items = list(enumerate(value)) if repeated else [(None, value)]
        for i, v in items:
            at = path if i is None else f"{path}[{i}]"
            if fd.type == fd.TYPE_STRING:
                out[at] = _utf8_len(v)
            elif fd.type == fd.TYPE_MESSAGE:
                out.update(text_sizes(v, at + "."))
    return out
