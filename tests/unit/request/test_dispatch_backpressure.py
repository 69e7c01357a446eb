"""The dispatcher under pressure, with a stand-in Triton client: a slow reader of drafts gets them coalesced
(bounded memory, canvases and finals all delivered, order kept), and the in-flight count always comes back."""

import asyncio

import pytest

from service import DEFAULT_CHECKPOINT
from service.request import dispatch, jobs
from service.request.catalog import ServedModel
from service.request.dispatch import Dispatcher, EventBuffer
from service.request.jobs import Job
from service.request.triton_client import BackendEvent
from service.telemetry.metrics import FrontMetrics

DRAFTS_PER_CANVAS, CANVASES = 2000, 3


def ev(kind: str, canvas: int, step: int = 0) -> BackendEvent:
    return BackendEvent(kind=kind, ids=[1, 2, 3], text="x", canvas_index=canvas, step=step)


class FloodingTriton:
    """Every draft at once (as fast as Triton can send them), then the canvas; a final at the end."""

    def __init__(self) -> None:
        self.sent = 0

    async def stream(self, inputs, **kw):
        for c in range(CANVASES):
            for s in range(DRAFTS_PER_CANVAS):
                self.sent += 1
                yield ev("draft", c, s)
            yield ev("canvas", c, DRAFTS_PER_CANVAS)
        yield ev("final", CANVASES - 1)


@pytest.fixture(scope="module")
def model() -> ServedModel:
    return ServedModel.load(DEFAULT_CHECKPOINT, "diffusiongemma", "torch-float32-cpu")


def job(n: int = 1) -> Job:
    return Job(request_id="r", prompt_ids=[2, 5], options=jobs.Options(num_variations=n), return_drafts=True)


def test_slow_reader_of_drafts_gets_them_coalesced_and_loses_no_canvas(model):
    async def main():
        d = Dispatcher(model, FloodingTriton(), 8)
        d.stream_buffer = 4
        got: list[tuple[int, BackendEvent]] = []
        async for i, e in d.run(job(2), metrics=metrics.request("GenerateStream")):
            got.append((i, e))
            await asyncio.sleep(0.001)  # a slow reader: the producers run far ahead of it
        return d, got

    metrics = FrontMetrics()
    d, got = asyncio.run(main())
    delivered = sum(e.kind == "draft" for _, e in got)
    assert metrics.drafts_coalesced._value.get() == 2 * CANVASES * DRAFTS_PER_CANVAS - delivered
    for v in range(2):
        mine = [e for i, e in got if i == v]
        assert [e.canvas_index for e in mine if e.kind == "canvas"] == list(range(CANVASES))
        assert [e.kind for e in mine][-1] == "final"
        drafts = [e for e in mine if e.kind == "draft"]
        # without coalescing every one of the 6,000 drafts is queued and delivered
        assert len(drafts) < CANVASES * DRAFTS_PER_CANVAS / 10, len(drafts)
        # order within the variation: a canvas never comes before a draft of an earlier canvas
        seen = -1
        for e in mine:
            assert e.canvas_index >= seen
            seen = e.canvas_index if e.kind == "canvas" else seen
    assert d.inflight == 0


def test_event_buffer_bound_and_latest_draft_wins():
    async def main():
        buf = EventBuffer(bound=2)
        for s in range(50):
            await buf.put(0, ev("draft", 0, s))
        await buf.put(1, ev("draft", 0, 7))
        await buf.put(0, ev("canvas", 0, 50))
        await buf.put(0, ev("draft", 1, 1))
        assert len(buf) == 3 and buf.coalesced == 50  # the 49 older drafts of variation 0, and 0's last before
        await buf.put(1, ev("canvas", 0, 9))  # the bound: two canvases now
        blocked = asyncio.create_task(buf.put(1, ev("final", 0)))
        await asyncio.sleep(0.05)
        assert not blocked.done()  # a canvas or final waits for room, it is never dropped
        out = [await buf.get() for _ in range(3)]
        await asyncio.wait_for(blocked, 1)
        out += [await buf.get() for _ in range(2)]
        return out

    out = asyncio.run(main())
    assert [(i, e.kind, e.step) for i, e in out] == [
        (1, "draft", 7), (0, "canvas", 50), (0, "draft", 1), (1, "canvas", 9), (1, "final", 0)]


def test_inflight_count_comes_back_when_the_setup_fails(model, monkeypatch):
    """Finding 8: the count was taken before the `try` that gives it back; a failure in between leaked it
    (after max_inflight such failures every call was refused as overloaded)."""
    def broken(_ctx):
        raise RuntimeError("trace propagation failed")

    monkeypatch.setattr(dispatch, "traceparent_metadata", broken)

    async def main():
        d = Dispatcher(model, FloodingTriton(), 4)
        for _ in range(3):
            with pytest.raises(RuntimeError):
                async for _ in d.run(job(2)):
                    pass
        return d.inflight

    assert asyncio.run(main()) == 0


@pytest.mark.parametrize("params, length, field", [
    ({"max_denoising_steps": 0}, None, "options.parameters.max_denoising_steps"),
    ({"t_min": 0.9, "t_max": 0.5}, None, "options.parameters.t_max"),
    ({}, 0, "max_new_tokens"),
])
def test_bad_parameters_are_refused_as_such_even_when_full(model, params, length, field):
    """The soak found bad values refused as overload (RESOURCE_EXHAUSTED) while the front was at its limit:
    they were only checked by the engine, after admission. Now checked first, under the request's field names."""
    from service.errors import InvalidArgument

    async def main():
        d = Dispatcher(model, FloodingTriton(), 4)
        d.inflight = 4  # full
        bad = Job(request_id="r", prompt_ids=[2, 5], options=jobs.Options(params=params), max_new_tokens=length,
                  field_names=jobs.field_names("text"))
        with pytest.raises(InvalidArgument) as e:
            async for _ in d.run(bad):
                pass
        return e.value

    e = asyncio.run(main())
    assert e.field == field, e
