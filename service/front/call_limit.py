"""The cap on public calls in flight at once (NIM_MAX_CONCURRENT_RPCS), one counter for both fronts: the gRPC
interceptor and the HTTP app take their slots here. Health checks never take one, so a pod at its limit still
answers its probes."""

from __future__ import annotations

from collections.abc import Callable

from service.errors import Overloaded


class CallLimit:
    """At most `limit` calls at once over gRPC and HTTP together. Used on the front's event loop only (both
    servers run there): no lock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        # RESOURCE_EXHAUSTED / 429 by the error table
        self.refusal = Overloaded(f"too many concurrent calls (this server's limit is {limit}); retry later")

    def acquire(self) -> Callable[..., None] | None:
        """A slot, as the function that gives it back (idempotent: call it from every path that may end the
        call), or None at the limit."""
        if self.active >= self.limit:
            return None
        self.active += 1
        released = False

        def release(*_: object) -> None:
            nonlocal released
            if not released:
                released = True
                self.active -= 1

        return release
