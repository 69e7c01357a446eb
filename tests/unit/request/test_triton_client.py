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


@pytest.mark.parametrize("tensor", [Tensor("INT32", [2**31]), Tensor("UINT64", [-1]), Tensor("INT32", ["x"])])
def test_a_value_its_type_cannot_hold_is_the_named_fields_error(tensor):
    """A value past its Triton type's range is refused naming the request's field, never an internal error."""
    from service.errors import InvalidArgument

    async def run():
        client = TritonClient("127.0.0.1:1", "diffusiongemma")
        client._stub.ModelStreamInfer = lambda *a, **k: pytest.fail("nothing is sent")
        with pytest.raises(InvalidArgument) as e:
            async for _ in client.stream({"stability_threshold": tensor},
                                         field_names={"stability_threshold": "options.parameters.stability_threshold"}):
                pass
        await client.close()
        return e.value

    assert asyncio.run(run()).field == "options.parameters.stability_threshold"
