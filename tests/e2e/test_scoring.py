"""Scoring against the running `dgemma serve` (Triton included): the Score RPC, and OpenAI's echo + logprobs on
/v1/completions through the official `openai` SDK; held-out Python outscores its own tokens shuffled."""

from __future__ import annotations

import json
import random
from pathlib import Path

import grpc
import openai
import pytest

from service.api.diffusiongemma.v1 import diffusiongemma_pb2 as pb
from service.text.tokenizer import load_tokenizer
from tests.e2e.conftest import API_KEY

SNIPPETS = Path(__file__).resolve().parents[1] / "assets" / "heldout_snippets.json"
CODE = "def add(a, b):\n    return a + b\n"


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)


def score(server, **kw) -> pb.ScoreResponse:
    return server.stub().Score(pb.ScoreRequest(**kw), metadata=server.metadata(), timeout=120)


def test_score_rpc(server, model_dir):
    tok = load_tokenizer(model_dir)
    r = score(server, context_text="def add(a, b):\n", continuation_text="    return a + b\n", seed=3, top_logprobs=2,
              score_samples=4, request_id="score-1")
    want = tok.encode("    return a + b\n", add_bos=False)
    assert r.request_id == "score-1" and [t.token_id for t in r.tokens] == want
    assert r.total_logprob == pytest.approx(sum(t.logprob for t in r.tokens), abs=1e-3)
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in r.tokens)
    assert r.score_samples == 4 and r.stats.decoder_passes == 4 and r.usage.completion_tokens == len(want)
    again = score(server, context_ids=pb.TokenIds(ids=tok.encode("def add(a, b):\n")),
                  continuation_ids=pb.TokenIds(ids=want), seed=3, top_logprobs=2, score_samples=4)
    assert [t.logprob for t in again.tokens] == [t.logprob for t in r.tokens]  # reproducible for a seed


@pytest.mark.parametrize("kw,field", [
    (dict(context_text="x", continuation_text="y", score_samples=0), "score_samples"),
    (dict(context_text="x", continuation_text="y", top_logprobs=21), "top_logprobs"),
    (dict(context_text="x"), "continuation_text"),
    (dict(context_text="x", continuation_ids=pb.TokenIds(ids=[99999])), "continuation_ids.ids[0]"),
])
def test_score_rpc_errors_name_the_field(server, kw, field):
    with pytest.raises(grpc.RpcError) as e:
        score(server, **kw)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(field + ":")


def test_echo_logprobs_over_the_prompt_with_openai(oai, model_dir):
    ids = load_tokenizer(model_dir).encode(CODE)
    r = oai.completions.create(model="diffusiongemma", prompt=CODE, echo=True, logprobs=2, max_tokens=0, seed=1)
    c = r.choices[0]
    assert c.text == CODE and r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(len(d) <= 2 for d in lp.top_logprobs[1:])
    # with generated tokens: the prompt's entries come first, from the same estimator (same seed, same values)
    g = oai.completions.create(model="diffusiongemma", prompt=CODE, echo=True, logprobs=1, max_tokens=8, seed=1,
                               extra_body={"max_denoising_steps": 4})
    glp = g.choices[0].logprobs
    assert g.choices[0].text.startswith(CODE) and len(glp.tokens) == len(ids) + g.usage.completion_tokens
    assert glp.token_logprobs[: len(ids)] == lp.token_logprobs
    assert glp.text_offset == sorted(glp.text_offset)


def test_held_out_python_outscores_its_tokens_shuffled(oai):
    """On each of 20 held-out snippets (112 tokens: two canvases), through /v1/completions echo at the default
    sample count: the snippet's summed log-prob is above that of the same tokens in a shuffled order."""
    snippets = json.loads(SNIPPETS.read_text())["snippets"][:20]
    real = [s["prefix"] + s["gap"] + s["suffix"] for s in snippets]
    shuffled = []
    for i, ids in enumerate(real):
        rest = ids[1:]
        random.Random(i).shuffle(rest)
        shuffled.append(ids[:1] + rest)
    r = oai.completions.create(model="diffusiongemma", prompt=real + shuffled, echo=True, logprobs=0, max_tokens=0,
                               seed=7)
    sums = [sum(c.logprobs.token_logprobs[1:]) for c in sorted(r.choices, key=lambda c: c.index)]
    margins = [a - b for a, b in zip(sums[:20], sums[20:])]
    assert all(m > 0 for m in margins), margins
