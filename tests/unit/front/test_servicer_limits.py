"""The servicer's front-door limits, called directly with a stand-in tokenizer: oversize text is refused
before anything is tokenized (the field named), and tokenizing runs off the event loop."""

import asyncio
import dataclasses
import time

import pytest

from service import DEFAULT_CHECKPOINT
from service.api.diffusiongemma.v1 import diffusiongemma_pb2 as pb
from service.errors import InvalidArgument
from service.front.servicer import DiffusionGemmaServicer
from service.request.catalog import ServedModel
from service.request.dispatch import Dispatcher
from service.request.limits import PromptLimits, text_sizes


class CountingTokenizer:
    """The real tokenizer, counting calls; `delay` seconds of blocking work per call."""

    def __init__(self, real, delay: float = 0.0) -> None:
        self.real, self.delay, self.calls = real, delay, 0

    def encode(self, text, add_bos=True):
        self.calls += 1
        time.sleep(self.delay)
        return self.real.encode(text, add_bos)

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.fixture(scope="module")
def model() -> ServedModel:
    return ServedModel.load(DEFAULT_CHECKPOINT, "diffusiongemma", "torch-float32-cpu")


def servicer(model, tok, limits: PromptLimits | None = None) -> DiffusionGemmaServicer:
    d = Dispatcher(dataclasses.replace(model, tokenizer=tok), triton=None)
    if limits is not None:
        d.limits = limits
    return DiffusionGemmaServicer(d)


@pytest.mark.parametrize("request_, field", [
    (pb.GenerateRequest(text="x" * 5000), "text"),
    (pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="hi"),
                                               pb.ChatMessage(role="user", content="y" * 5000)])),
     "chat.messages[1].content"),
    (pb.TokenizeRequest(text="z" * 5000), "text"),
    (pb.InfillRequest(prefix="a", suffix="b" * 5000, gap_tokens=4), "suffix"),
    (pb.TemplateRequest(skeleton="{{number:2}}", instruction="i" * 5000), "instruction"),
])
def test_oversize_text_is_refused_before_tokenizing(model, request_, field):
    tok = CountingTokenizer(model.tokenizer)
    s = servicer(model, tok, PromptLimits(max_bytes=4096, max_tokens=8192, max_token_bytes=4))
    method = {pb.GenerateRequest: s.Generate, pb.TokenizeRequest: s.Tokenize, pb.InfillRequest: s.Infill,
              pb.TemplateRequest: s.Template}[type(request_)]
    with pytest.raises(InvalidArgument) as e:
        asyncio.run(method(request_, None))
    assert e.value.field == field and "4096 bytes" in e.value.detail
    assert tok.calls == 0


def test_token_estimate_and_raw_ids_are_capped(model):
    tok = CountingTokenizer(model.tokenizer)
    s = servicer(model, tok, PromptLimits(max_bytes=1 << 20, max_tokens=100, max_token_bytes=4))
    with pytest.raises(InvalidArgument) as e:  # 404 bytes: at least 101 tokens of at most 4 bytes
        asyncio.run(s.Generate(pb.GenerateRequest(text="w" * 404), None))
    assert e.value.field == "text" and "at least 101 tokens" in e.value.detail
    with pytest.raises(InvalidArgument) as e:
        asyncio.run(s.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 101)), None))
    assert e.value.field == "token_ids.ids"
    assert tok.calls == 0
    # within the limits: tokenized, and the estimate was a lower bound (BOS aside)
    assert len(asyncio.run(s.Tokenize(pb.TokenizeRequest(text="w" * 400), None)).token_ids) - 1 >= 400 // 4


def test_text_sizes_walks_nested_and_repeated_fields():
    r = pb.EditRequest(text="é" * 3, instruction="ab", editable=[pb.Span(start=0, end=1)])
    assert text_sizes(r) == {"text": 6, "instruction": 2}


def test_tokenizing_runs_off_the_event_loop(model):
    """A slow tokenization (1 s of blocking work) must not stall the loop that serves every other call."""
    s = servicer(model, CountingTokenizer(model.tokenizer, delay=1.0))

    async def main():
        gaps, stop = [], asyncio.Event()

        async def ticker():
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        t = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        reply = await s.Tokenize(pb.TokenizeRequest(text="hello"), None)
        stop.set()
        await t
        return reply, max(gaps)

    reply, worst_gap = asyncio.run(main())
    assert reply.token_ids
    assert worst_gap < 0.5, f"the event loop stalled for {worst_gap:.2f} s"
