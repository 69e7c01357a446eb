"""The front's backend call carries the caller's deadline to the engine as `timeout_ms` (issue 17, finding 4)."""

import asyncio

import pytest

from service.errors import DeadlineExceeded
from service.request.triton_client import Tensor, TritonClient


class FakeCall:
    """A ModelStreamInfer call that records its request and answers one DEADLINE_EXCEEDED error."""

    def __init__(self, requests, seen):
        self.requests, self.seen = requests, seen

    def __aiter__(self):
        return self._responses()

    async def _responses(self):
        async for r in self.requests:
            self.seen.append(r)

        class Response:
            error_message = "DEADLINE_EXCEEDED: deadline exceeded"

        yield Response()

    def cancel(self):
        pass


@pytest.mark.parametrize("timeout, want", [(2.5, [2500]), (0.0001, [1]), (None, None)])
def test_the_deadline_travels_as_timeout_ms(timeout, want):
    async def run():
        client = TritonClient("127.0.0.1:1", "diffusiongemma")
        seen = []
        client._stub.ModelStreamInfer = lambda requests, timeout=None, metadata=(): FakeCall(requests, seen)
        with pytest.raises(DeadlineExceeded):
            async for _ in client.stream({"input_ids": Tensor("INT32", [2, 3])}, timeout=timeout):
                pass
        await client.close()
        return {t.name: list(t.contents.uint64_contents) for t in seen[0].inputs}

    inputs = asyncio.run(run())
    assert inputs.get("timeout_ms") == want
