"""Log-probabilities through the official `openai` SDK against the running `dgemma serve` (Triton included):
their shapes, their count (the returned tokens: completion_tokens), the cut by max_tokens and stop, streaming."""

from __future__ import annotations

import openai
import pytest

from tests.e2e.conftest import API_KEY

STEPS = {"max_denoising_steps": 4}
MSG = [{"role": "user", "content": "def add(a, b):"}]


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_completion_logprobs(oai):
    r = oai.completions.create(model="diffusiongemma", prompt="def ", max_tokens=40, logprobs=3, seed=2,
                               extra_body=STEPS)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert n > 0 and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(d) == 3 and all(v <= 0 for v in d.values()) for d in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    # the tokens are the choice's: the same ids and text as without logprobs
    plain = oai.completions.create(model="diffusiongemma", prompt="def ", max_tokens=40, seed=2, extra_body=STEPS)
    assert plain.choices[0].text == r.choices[0].text and plain.choices[0].logprobs is None
    assert plain.choices[0].model_extra["token_ids"] == r.choices[0].model_extra["token_ids"]


def test_chat_logprobs_cut_by_max_tokens_and_stop(oai):
    whole = oai.chat.completions.create(model="diffusiongemma", messages=MSG, max_tokens=60, logprobs=True,
                                        top_logprobs=2, seed=4, extra_body={**STEPS, "ignore_eos": True})
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens == 60
    assert all(c.logprob <= 0 and len(c.top_logprobs) == 2 and c.bytes is not None for c in content)
    cut = oai.chat.completions.create(model="diffusiongemma", messages=MSG, max_tokens=7, logprobs=True,
                                      top_logprobs=2, seed=4, extra_body={**STEPS, "ignore_eos": True})
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 7
    assert [c.model_dump() for c in cut.choices[0].logprobs.content] == [c.model_dump() for c in content[:7]]
    text = whole.choices[0].message.content
    stop = text[10:13] if len(text) > 14 and text[10:13].strip() else None
    if stop:  # a stop sequence: the tokens through the one that completed it, as completion_tokens counts them
        stopped = oai.chat.completions.create(model="diffusiongemma", messages=MSG, max_tokens=60, logprobs=True,
                                              seed=4, stop=[stop], extra_body={**STEPS, "ignore_eos": True})
        assert len(stopped.choices[0].logprobs.content) == stopped.usage.completion_tokens < 60
        assert all(c.top_logprobs == [] for c in stopped.choices[0].logprobs.content)  # top_logprobs unset: 0


@pytest.mark.parametrize("chat", [False, True])
def test_streamed_chunks_carry_their_own_tokens(oai, chat):
    kw = dict(model="diffusiongemma", max_tokens=100, seed=6, stream=True, stream_options={"include_usage": True},
              extra_body={**STEPS, "ignore_eos": True})
    if chat:
        chunks = list(oai.chat.completions.create(messages=MSG, logprobs=True, top_logprobs=1, **kw))
        entries = [c for ch in chunks for choice in ch.choices if choice.logprobs for c in choice.logprobs.content]
        text = "".join(choice.delta.content or "" for ch in chunks for choice in ch.choices)
    else:
        chunks = list(oai.completions.create(prompt="def ", logprobs=1, **kw))
        parts = [choice.logprobs for ch in chunks for choice in ch.choices if choice.logprobs]
        entries = [t for p in parts for t in p.tokens]
        offsets = [o for p in parts for o in p.text_offset]
        assert offsets == sorted(offsets) and len(parts) >= 2  # offsets run on across the chunks
        text = "".join(choice.text for ch in chunks for choice in ch.choices)
    assert len(entries) == chunks[-1].usage.completion_tokens == 100
    assert text  # the text still streams as before
