"""What real OpenAI clients send, through the official `openai` SDK against the running `dgemma serve`: fields
this server does not know (ignored and counted), lists of prompts, stream_options, vLLM's root routes, tool turns.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.e2e.conftest import API_KEY

STEPS = {"max_denoising_steps": 4}


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http_url, timeout=120, headers={"authorization": f"Bearer {API_KEY}"}) as c:
        yield c


def test_unknown_fields_are_ignored_and_counted_by_name(server, oai):
    before = server.metric("dgemma_front_ignored_fields_total", field="frobnicate") or 0
    r = oai.completions.create(model="diffusiongemma", prompt="def ", max_tokens=8, seed=1,
                               extra_body={**STEPS, "frobnicate": {"a": 1}, "user": "u"})
    plain = oai.completions.create(model="diffusiongemma", prompt="def ", max_tokens=8, seed=1, extra_body=STEPS)
    assert r.choices[0].text == plain.choices[0].text  # ignored means without effect
    assert server.metric("dgemma_front_ignored_fields_total", field="frobnicate") == before + 1
    assert server.metric("dgemma_front_ignored_fields_total", field="user") >= 1


def test_a_list_of_prompts_gives_every_choice_prompt_major(oai):
    prompts = ["def ", [2, 100, 101], "class "]
    r = oai.completions.create(model="diffusiongemma", prompt=prompts, max_tokens=16, n=2, seed=5, extra_body=STEPS)
    assert [c.index for c in r.choices] == list(range(6))
    for k, p in enumerate(prompts):
        alone = oai.completions.create(model="diffusiongemma", prompt=p, max_tokens=16, n=2, seed=5, extra_body=STEPS)
        for i in range(2):
            assert r.choices[k * 2 + i].text == alone.choices[i].text, (k, i)
            assert r.choices[k * 2 + i].model_extra["token_ids"] == alone.choices[i].model_extra["token_ids"]
    singles = [oai.completions.create(model="diffusiongemma", prompt=p, max_tokens=16, n=2, seed=5, extra_body=STEPS)
               for p in prompts]
    assert r.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert r.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)

    streamed: dict[int, str] = {}
    for chunk in oai.completions.create(model="diffusiongemma", prompt=prompts, max_tokens=16, n=2, seed=5,
                                        stream=True, extra_body=STEPS):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {c.index: c.text for c in r.choices}


def test_stream_usage_null_until_the_last_chunk_and_continuous_usage(oai):
    chunks = list(oai.chat.completions.create(model="diffusiongemma", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=128, stream=True, stream_options={"include_usage": True},
                                              extra_body=STEPS))
    assert all(ch.usage is None for ch in chunks[:-1]) and chunks[-1].usage.total_tokens > 0
    assert chunks[-1].choices == []
    chunks = list(oai.completions.create(model="diffusiongemma", prompt="def ", max_tokens=128, stream=True,
                                         stream_options={"continuous_usage_stats": True}, extra_body=STEPS))
    so_far = [ch.usage.completion_tokens for ch in chunks]
    assert so_far == sorted(so_far) and so_far[-1] > 0 and all(ch.usage.prompt_tokens > 0 for ch in chunks)


def test_model_by_id_and_vllm_root_routes(server, oai, http):
    assert oai.models.retrieve("diffusiongemma").id == "diffusiongemma"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-4o")
    assert httpx.get(server.http_url + "/health").status_code == 200  # open, like /v1/health/ready
    ids = http.post("/tokenize", json={"prompt": "def add(a, b):", "add_special_tokens": False}).json()["tokens"]
    with_bos = http.post("/tokenize", json={"prompt": "def add(a, b):"}).json()["tokens"]
    assert with_bos == [2, *ids]
    assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == "def add(a, b):"
    assert http.post("/v1/detokenize", json={"tokens": ids}).json()["prompt"] == "def add(a, b):"
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] and info["bos_token"] == "<bos>" and info["vocab_size"] > 0
    r = http.post("/detokenize", json={"tokens": [10**9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens[0]"


def test_a_replayed_tool_turn_goes_through_the_chat_template(oai):
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    messages = [{"role": "user", "content": "Add 1 and 2."},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
    r = oai.chat.completions.create(model="diffusiongemma", messages=messages, max_tokens=16, extra_body=STEPS)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > 10


CANVAS = 64


def test_max_tokens_is_a_hard_cap_on_both_routes(oai):
    r = oai.completions.create(model="diffusiongemma", prompt="def ", max_tokens=16, n=2, seed=3,
                               extra_body={**STEPS, "ignore_eos": True})
    for c in r.choices:
        assert len(c.model_extra["token_ids"]) == 16 and c.finish_reason == "length"
    assert r.usage.completion_tokens == sum(sum(t != 0 for t in c.model_extra["token_ids"]) for c in r.choices)
    alias = oai.completions.create(model="diffusiongemma", prompt="def ", n=2, seed=3,
                                   extra_body={**STEPS, "ignore_eos": True, "max_completion_tokens": 16})
    assert [c.text for c in alias.choices] == [c.text for c in r.choices]
    chat = oai.chat.completions.create(model="diffusiongemma", messages=[{"role": "user", "content": "hi"}],
                                       max_completion_tokens=10, extra_body={**STEPS, "ignore_eos": True})
    assert len(chat.choices[0].model_extra["token_ids"]) == 10 and chat.usage.completion_tokens <= 10


def test_stop_cuts_the_text_ends_the_choice_and_streams_the_same(oai):
    kw = dict(model="diffusiongemma", prompt="def ", max_tokens=3 * CANVAS, seed=3,
              extra_body={**STEPS, "ignore_eos": True})
    full = oai.completions.create(**kw).choices[0].text
    # a stop string that first occurs well inside the text
    at = next(a for a in range(len(full) // 3, len(full)) if full[a:a + 3].strip() and full.find(full[a:a + 3]) == a)
    stop = full[at:at + 3]
    r = oai.completions.create(**kw, stop=[stop, "\x00never"]).choices[0]
    assert r.text == full[:at] and r.finish_reason == "stop" and r.model_extra["stop_reason"] == stop
    streamed = "".join(ch.choices[0].text for ch in oai.completions.create(**kw, stop=stop, stream=True)
                       if ch.choices)
    assert streamed == full[:at]
    none = oai.completions.create(**kw, stop=[]).choices[0]  # OpenAI's no-op value
    assert none.text == full and none.finish_reason == "length"


def test_ignore_eos_runs_to_the_cap_where_eos_would_end_it(oai):
    steps = {"max_denoising_steps": 6}  # as tests/e2e/test_stopping.py, where some of these seeds end at an EOS
    for seed in range(16):
        kw = dict(model="diffusiongemma", prompt="x = 1\n", max_tokens=3 * CANVAS, seed=seed, extra_body=steps)
        plain = oai.completions.create(**kw).choices[0]
        if plain.finish_reason == "stop":
            break
    else:
        pytest.fail("no seed ended at an EOS")
    kw["extra_body"] = {**steps, "ignore_eos": True}
    ignored = oai.completions.create(**kw).choices[0]
    assert ignored.finish_reason == "length" and len(ignored.model_extra["token_ids"]) == 3 * CANVAS


def test_temperature_zero_is_greedy_and_repeatable_without_a_seed(oai):
    texts = {oai.completions.create(model="diffusiongemma", prompt="def ", max_tokens=32, temperature=0, seed=s,
                                    extra_body=STEPS).choices[0].text for s in (None, 1, 99)}
    assert len(texts) == 1
    sampled = {oai.completions.create(model="diffusiongemma", prompt="def ", max_tokens=32, temperature=0.7, seed=s,
                                      extra_body=STEPS).choices[0].text for s in (1, 99)}
    assert len(sampled) == 2  # what LangChain and the SDK's examples send: accepted, and it samples
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="diffusiongemma", prompt="def ", max_tokens=8, temperature=2.5)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="diffusiongemma", prompt="def ", max_tokens=8, top_p=0.9)
    assert e.value.param == "top_p"
