"""Bearer-token auth, the same keys for both fronts."""

from __future__ import annotations

import hmac
from collections.abc import Sequence


class BearerKeys:
    """`Bearer <key>` must match one of the keys, compared in constant time."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

    def __bool__(self) -> bool:
        return bool(self._keys)

    def accepts(self, authorization: str) -> bool:
        """`authorization`: the header's (or metadata's) value, "" when absent."""
        scheme, _, token = authorization.partition(" ")
        token_b = token.strip().encode()
        matched = False
        for key in self._keys:  # no early exit: the time taken does not depend on which key matched
            matched |= hmac.compare_digest(token_b, key)
        return scheme.lower() == "bearer" and matched
