"""Log-probs in OpenAI's shapes, checked against the `openai` package's own types."""

import math

from openai.types.chat.chat_completion import ChoiceLogprobs
from openai.types.completion_choice import Logprobs as CompletionLogprobs

from service import DEFAULT_CHECKPOINT
from service.front.openai_logprobs import FLOOR, Offsets, TokenTexts, chat_logprobs, completion_logprobs
from service.front.openai_schema import ChatRequest, CompletionRequest, parse
from service.logprobs import Logprobs
from service.text.tokenizer import load_tokenizer

import json
import pytest

from service.errors import InvalidArgument

TOK = load_tokenizer(DEFAULT_CHECKPOINT)
PAD = 0


def _lp(ids):
    n = len(ids)
    return Logprobs([-0.1 * k for k in range(n)], [[t, 7] for t in ids], [[-0.1 * k, -math.inf] for k in range(n)])


def test_completion_shape_offsets_and_pad():
    texts = TokenTexts(TOK, PAD)
    ids = TOK.encode("héllo wörld", add_bos=False) + [1, PAD, PAD]  # EOS, then pad
    out = completion_logprobs(ids, _lp(ids), texts, Offsets(texts))
    CompletionLogprobs.model_validate(out)
    n = len(ids) - 2
    assert len(out["tokens"]) == len(out["token_logprobs"]) == len(out["top_logprobs"]) == n
    assert out["tokens"][1].startswith("bytes:\\x") and out["tokens"][-1] == "<eos>"
    assert all(FLOOR in d.values() for d in out["top_logprobs"])  # -inf is written as vLLM does
    text = TOK.decode(ids)
    assert [text[o:] for o in out["text_offset"]][0] == text and out["text_offset"][-1] == len(text)
    assert text[out["text_offset"][3]:].startswith("l")  # after the split é: offsets count characters


def test_chat_shape():
    texts = TokenTexts(TOK, PAD)
    ids = TOK.encode("def f", add_bos=False)
    out = chat_logprobs(ids, _lp(ids), texts)
    parsed = ChoiceLogprobs.model_validate(out)
    assert len(parsed.content) == len(ids) and len(parsed.content[0].top_logprobs) == 2
    assert bytes(parsed.content[0].bytes).decode() == parsed.content[0].token


@pytest.mark.parametrize("model, fields, expected", [
    (CompletionRequest, {"prompt": "a"}, None), (CompletionRequest, {"prompt": "a", "logprobs": False}, None),
    (CompletionRequest, {"prompt": "a", "logprobs": 0}, 0), (CompletionRequest, {"prompt": "a", "logprobs": 5}, 5),
    (ChatRequest, {"messages": [], "logprobs": True}, 0),
    (ChatRequest, {"messages": [], "logprobs": True, "top_logprobs": 20}, 20),
    (ChatRequest, {"messages": [], "logprobs": False}, None),
])
def test_logprob_counts(model, fields, expected):
    assert parse(model, json.dumps(fields).encode())[0].logprob_count() == expected


@pytest.mark.parametrize("model, fields, field", [
    (CompletionRequest, {"prompt": "a", "logprobs": 6}, "logprobs"),
    (CompletionRequest, {"prompt": "a", "logprobs": -1}, "logprobs"),
    (CompletionRequest, {"prompt": "a", "logprobs": True}, "logprobs"),
    (ChatRequest, {"messages": [], "top_logprobs": 1}, "top_logprobs"),
    (ChatRequest, {"messages": [], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
])
def test_logprob_ranges_name_the_field(model, fields, field):
    with pytest.raises(InvalidArgument) as e:
        parse(model, json.dumps(fields).encode())[0].logprob_count()
    assert e.value.field == field
