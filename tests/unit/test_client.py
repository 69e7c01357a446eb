"""service.client against a fake in-process gRPC server."""

import asyncio
from contextlib import aclosing

import grpc
import pytest

from service.api.diffusiongemma.v1 import diffusiongemma_pb2 as pb
from service.client import AsyncClient, Client, ClientError, build_request
from tests.unit.fake_dgemma import fake_server, free_address


@pytest.fixture(scope="module")
def served():
    with fake_server() as (target, servicer):
        yield target, servicer


@pytest.fixture
def server(served):
    target, servicer = served
    servicer.calls.clear()
    servicer.stream_done.clear()
    servicer.stream_completed = False
    return target, servicer


# --- requests from keywords -------------------------------------------------------------------------

def test_generate_request_sets_every_field():
    got = build_request("Generate", text="hi", max_new_tokens=32, max_denoising_steps=12, entropy_bound=0.25,
                        t_min=0.5, t_max=0.75, stability_threshold=2, confidence_threshold=0.0, sampler="fast",
                        seed=9, num_variations=3, request_id="r-1", model="m", return_drafts=True)
    params = pb.DiffusionParameters(max_denoising_steps=12, entropy_bound=0.25, t_min=0.5, t_max=0.75,
                                    stability_threshold=2, confidence_threshold=0.0, sampler=pb.SAMPLER_FAST)
    assert got == pb.GenerateRequest(model="m", text="hi", max_new_tokens=32, return_drafts=True, request_id="r-1",
                                     options=pb.GenerationOptions(parameters=params, seed=9, num_variations=3))
    # an explicit 0 is sent (optional fields), unlike an omitted keyword
    assert got.options.parameters.HasField("confidence_threshold")


def test_unset_keywords_stay_unset():
    got = build_request("Generate", chat=[("user", "hi"), pb.ChatMessage(role="model", content="yo")])
    assert got.WhichOneof("prompt") == "chat"
    assert [(m.role, m.content) for m in got.chat.messages] == [("user", "hi"), ("model", "yo")]
    assert not got.HasField("options") and not got.HasField("max_new_tokens")
    assert build_request("Generate", token_ids=[2, 5]).token_ids.ids == [2, 5]
    assert build_request("Generate", sampler="reference").options.parameters.sampler == pb.SAMPLER_REFERENCE


def test_other_requests():
    assert build_request("Infill", prefix="a", suffix="b", gap_tokens=4, seed=1) == pb.InfillRequest(
        prefix="a", suffix="b", gap_tokens=4, options=pb.GenerationOptions(seed=1))
    edit = build_request("Edit", text="abc", spans=[(0, 1), (1, 3, 5)], instruction="shorter")
    assert [(s.start, s.end, s.length_tokens) for s in edit.editable] == [(0, 1, 0), (1, 3, 5)]
    assert edit.text == "abc" and edit.instruction == "shorter"
    t = build_request("Template", parts=['{"age": ', ("age", "number", 2), "}"], instruction="Bob is 42")
    assert t.parts[0].literal == '{"age": ' and t.parts[2].literal == "}"
    assert t.parts[1].hole == pb.Hole(name="age", type=pb.HOLE_TYPE_NUMBER, length_tokens=2)
    assert build_request("Template", skeleton="{{n:number:2}}").skeleton == "{{n:number:2}}"
    assert build_request("Tokenize", chat=[("user", "x")]).chat.messages[0].content == "x"
    assert build_request("ListModels") == pb.ListModelsRequest()
    score = build_request("Score", context_text="def f(", continuation_ids=[5, 6], score_samples=4, seed=2)
    assert score == pb.ScoreRequest(context_text="def f(", continuation_ids=pb.TokenIds(ids=[5, 6]), score_samples=4,
                                    seed=2)


def test_bad_keywords():
    with pytest.raises(ValueError, match="one prompt"):
        build_request("Generate", text="a", token_ids=[1])
    with pytest.raises(ValueError, match="sampler"):
        build_request("Generate", text="a", sampler="greedy")
    with pytest.raises(TypeError, match="gap_tokens"):
        build_request("Generate", text="a", gap_tokens=3)
    with pytest.raises(ValueError, match="spans"):
        build_request("Edit", text="a", spans=[(1,)])
    with pytest.raises(ValueError, match="skeleton or as parts"):
        build_request("Template", skeleton="x", parts=["x"])
    with pytest.raises(ValueError, match="together"):
        Client("127.0.0.1:1", client_certificate=b"cert")


# --- the blocking client ----------------------------------------------------------------------------

def test_generate_sends_request_and_bearer(server):
    target, servicer = server
    with Client(target, api_key="sekret", timeout=10) as c:
        r = c.generate("hi", max_new_tokens=16, max_denoising_steps=3, seed=5, num_variations=2, request_id="abc")
    assert [ch.text for ch in r.choices] == ["hello 0", "hello 1"] and r.request_id == "abc"
    name, request, metadata = servicer.calls[-1]
    assert name == "Generate"
    assert request == build_request("Generate", text="hi", max_new_tokens=16, max_denoising_steps=3, seed=5,
                                    num_variations=2, request_id="abc")
    assert metadata["authorization"] == "Bearer sekret"


def test_no_api_key_no_authorization(server):
    target, servicer = server
    with Client(target) as c:
        c.list_models()
    assert "authorization" not in servicer.calls[-1][2]


def test_every_unary_method(server):
    target, servicer = server
    with Client(target, api_key="k") as c:
        assert c.infill("def f(", "):", 3, seed=2).choices[0].text == "def f(XX):"
        assert c.edit("abc", [(0, 1, 2)], "caps").choices[0].replacements == ["e"]
        assert c.template('{"age": {{age:number:2}}}', instruction="Bob").choices[0].named_values["age"] == "42"
        assert list(c.tokenize("ab").token_ids) == [2, 97, 98]
        assert c.list_models().models[0].id == "tiny"
        assert c.health() == "SERVING" and c.health("down") == "NOT_SERVING"
        scored = c.score([2, 3], "ab", score_samples=4, seed=1)
        assert [t.token_id for t in scored.tokens] == [97, 98] and scored.score_samples == 4
    names = [name for name, _, _ in servicer.calls]
    assert names == ["Infill", "Edit", "Template", "Tokenize", "ListModels", "Score"]
    assert list(servicer.calls[5][1].context_ids.ids) == [2, 3] and servicer.calls[5][1].continuation_text == "ab"
    assert servicer.calls[0][1].gap_tokens == 3 and servicer.calls[0][1].options.seed == 2
    assert servicer.calls[1][1].editable[0].length_tokens == 2 and servicer.calls[1][1].instruction == "caps"
    assert servicer.calls[2][1].skeleton == '{"age": {{age:number:2}}}'
    assert all(md["authorization"] == "Bearer k" for _, _, md in servicer.calls)


def test_errors_become_client_error(server):
    target, _ = server
    with Client(target) as c:
        with pytest.raises(ClientError) as e:
            c.generate("fail")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.message.startswith("max_new_tokens:")
        assert str(e.value).startswith("INVALID_ARGUMENT: max_new_tokens")
        with pytest.raises(ClientError) as e:
            c.generate("slow", timeout=0.2)
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(ClientError) as e:
            list(c.generate_stream("fail"))
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with Client(free_address()) as c:
        with pytest.raises(ClientError) as e:
            c.tokenize("x", timeout=5)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_stream_events_in_order(server):
    target, servicer = server
    with Client(target) as c:
        events = list(c.generate_stream(token_ids=[2, 3], return_drafts=True))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["draft"] * 3 + ["canvas", "final"]
    assert [e.draft.step for e in events[:3]] == [1, 2, 3]
    assert events[-1].final.choices[0].text == "hello 0"
    assert servicer.calls[-1][1].return_drafts and list(servicer.calls[-1][1].token_ids.ids) == [2, 3]


def test_stream_closed_early_cancels(server):
    target, servicer = server
    with Client(target) as c:
        stream = c.generate_stream("endless")
        assert next(stream).draft.step == 1 and next(stream).draft.step == 2
        stream.close()
        assert servicer.stream_done.wait(5), "the server never saw the call end"
    assert not servicer.stream_completed


# --- the asyncio client -----------------------------------------------------------------------------

def test_async_client(server):
    target, servicer = server

    async def run():
        async with AsyncClient(target, api_key="ak", timeout=10) as c:
            r = await c.generate("hi", seed=3, sampler="fast")
            events = [e async for e in c.generate_stream("hi", return_drafts=True)]
            infill = await c.infill("a", "b", 2)
            ids = (await c.tokenize("a")).token_ids
            models = await c.list_models()
            status = await c.health()
            with pytest.raises(ClientError) as e:
                await c.edit("fail", [(0, 1)])
            async with aclosing(c.generate_stream("endless")) as stream:
                async for ev in stream:
                    if ev.draft.step == 2:
                        break
            done = await asyncio.to_thread(servicer.stream_done.wait, 5)
        return r, events, infill, ids, models, status, e.value, done

    r, events, infill, ids, models, status, err, done = asyncio.run(run())
    assert r.choices[0].text == "hello 0" and r.choices[0].seed == 3
    assert [e.WhichOneof("event") for e in events][-2:] == ["canvas", "final"]
    assert infill.choices[0].text == "aXXb" and list(ids) == [2, 97] and models.models[0].id == "tiny"
    assert status == "SERVING"
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert done and not servicer.stream_completed
    generate = next(req for name, req, _ in servicer.calls if name == "Generate")
    assert generate.options.parameters.sampler == pb.SAMPLER_FAST and generate.options.seed == 3
    assert all(md["authorization"] == "Bearer ak" for _, _, md in servicer.calls)


def test_the_sdk_imports_nothing_of_the_server():
    import subprocess
    import sys

    code = ("import sys, service.client; print(sorted(m for m in sys.modules if m.startswith('service.') "
            "and not m.startswith(('service.api', 'service.client'))), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["[]", "False"], out.stdout + out.stderr
