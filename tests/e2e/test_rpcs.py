"""Every RPC of diffusiongemma.v1 against a real front and a real Triton serving the embedded model."""

from __future__ import annotations

import json

import grpc
import pytest

from service.api.diffusiongemma.v1 import diffusiongemma_pb2 as pb
from service.text.tokenizer import load_tokenizer

FAST = pb.GenerationOptions(parameters=pb.DiffusionParameters(max_denoising_steps=8))


def call(server, method: str, request, timeout: float = 120):
    return getattr(server.stub(), method)(request, metadata=server.metadata(), timeout=timeout)


def test_list_models_describes_the_served_model(server):
    (info,) = call(server, "ListModels", pb.ListModelsRequest()).models
    assert info.id == "diffusiongemma" and info.canvas_length == 64 and info.vocab_size == 2048
    assert info.profile == "torch-fp32-cpu"
    assert info.default_parameters.max_denoising_steps == 48 and info.default_max_new_tokens == 256


def test_tokenize_matches_the_checkpoint_tokenizer(server, model_dir):
    tok = load_tokenizer(model_dir)
    r = call(server, "Tokenize", pb.TokenizeRequest(text="def add(a, b):"))
    assert list(r.token_ids) == tok.encode("def add(a, b):") and len(r.tokens) == len(r.token_ids)
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="hi")])
    assert list(call(server, "Tokenize", pb.TokenizeRequest(chat=chat)).token_ids) == tok.chat_prompt([("user", "hi")])


def test_generate_with_variations(server, model_dir):
    r = call(server, "Generate", pb.GenerateRequest(
        text="def ", max_new_tokens=64, request_id="gen-1",
        options=pb.GenerationOptions(parameters=FAST.parameters, seed=5, num_variations=2)))
    assert r.request_id == "gen-1" and r.model == "diffusiongemma"
    assert [c.index for c in r.choices] == [0, 1] and [c.seed for c in r.choices] == [5, 6]
    for c in r.choices:
        assert len(c.token_ids) == 64 and c.finish_reason in (pb.FINISH_REASON_EOS, pb.FINISH_REASON_LENGTH)
        assert c.stats.decoder_passes >= 1 and list(c.stats.steps_per_canvas)
    assert r.choices[0].token_ids != r.choices[1].token_ids  # different seeds
    assert r.usage.prompt_tokens == len(load_tokenizer(model_dir).encode("def "))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # the same seed gives the same tokens
    again = call(server, "Generate", pb.GenerateRequest(text="def ", max_new_tokens=64, options=pb.GenerationOptions(
        parameters=FAST.parameters, seed=6)))
    assert again.choices[0].token_ids == r.choices[1].token_ids
    assert len(again.request_id) == 32  # generated when not given


def test_stream_yields_drafts_canvases_then_final_in_order(server):
    req = pb.GenerateRequest(text="import ", max_new_tokens=128, return_drafts=True, options=pb.GenerationOptions(
        parameters=pb.DiffusionParameters(max_denoising_steps=5, confidence_threshold=0.0), seed=1))
    events = list(server.stub().GenerateStream(req, metadata=server.metadata(), timeout=120))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "final" and "final" not in kinds[:-1]
    canvases = [e.canvas for e in events if e.HasField("canvas")]
    assert 1 <= len(canvases) <= 2 and [c.canvas_index for c in canvases] == list(range(len(canvases)))
    first = kinds.index("canvas")
    assert kinds[:first] == ["draft"] * 5
    assert [e.draft.step for e in events[:first]] == [1, 2, 3, 4, 5]
    assert events[first - 1].draft.token_ids == canvases[0].token_ids or canvases[0].steps == 5
    final = events[-1].final
    assert final.choices[0].token_ids[:64] == canvases[0].token_ids


def test_infill_keeps_prefix_and_suffix_byte_exact(server, model_dir):
    prefix = "def mean(values):\n    total = 0\n    for v in values:\n"
    suffix = "\n    return total / len(values)  # ünïcode ✓\n" + "# tail\n" * 40  # longer than the canvas
    options = pb.GenerationOptions(parameters=FAST.parameters, num_variations=2)
    r = call(server, "Infill", pb.InfillRequest(prefix=prefix, suffix=suffix, gap_tokens=8, options=options))
    assert len(r.choices) == 2
    for c in r.choices:
        assert c.text == prefix + c.infill + suffix
        assert c.text.encode().startswith(prefix.encode()) and c.text.encode().endswith(suffix.encode())
        assert len(c.infill_token_ids) == 8
        assert c.infill == load_tokenizer(model_dir).decode(list(c.infill_token_ids))


def test_edit_rewrites_only_the_spans(server):
    text = "x = compute(a, b)\nprint(x)\n"
    start = text.index("compute")
    r = call(server, "Edit", pb.EditRequest(text=text, editable=[pb.Span(start=start, end=start + 7)],
                                            options=FAST))
    (c,) = r.choices
    assert c.text == text[:start] + c.replacements[0] + text[start + 7:]
    assert c.replacements[0] != ""  # a TEXT hole holds no special token, so never decodes to nothing


def test_template_json_skeleton_parses_and_keeps_literals(server):
    skeleton = '{"name": "{{name:string:4}}", "count": {{count:number:2}}, "ok": true}'
    r = call(server, "Template", pb.TemplateRequest(skeleton=skeleton, options=pb.GenerationOptions(
        parameters=FAST.parameters, num_variations=3)))
    assert len(r.choices) == 3
    for c in r.choices:
        doc = json.loads(c.text)
        assert set(doc) == {"name", "count", "ok"} and doc["ok"] is True and isinstance(doc["count"], int)
        assert doc["name"] == c.named_values["name"] and str(doc["count"]) == c.named_values["count"]
        assert c.text.startswith('{"name": "') and c.text.endswith(', "ok": true}')
        assert list(c.values) == [c.named_values["name"], c.named_values["count"]]


def test_template_from_parts(server):
    parts = [pb.TemplatePart(literal="total = "), pb.TemplatePart(hole=pb.Hole(type=pb.HOLE_TYPE_NUMBER,
                                                                                length_tokens=1)),
             pb.TemplatePart(literal="\n")]
    (c,) = call(server, "Template", pb.TemplateRequest(parts=parts, options=FAST)).choices
    assert c.text.startswith("total = ") and c.text.endswith("\n") and c.values[0].isdigit()


@pytest.mark.parametrize("method, request_, field", [
    ("Generate", pb.GenerateRequest(text=""), "text"),
    ("Generate", pb.GenerateRequest(), "prompt"),
    ("Generate", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[2, 99999])), "token_ids.ids[1]"),
    ("Generate", pb.GenerateRequest(text="a", options=pb.GenerationOptions(
        parameters=pb.DiffusionParameters(max_denoising_steps=0))), "options.parameters.max_denoising_steps"),
    ("Generate", pb.GenerateRequest(text="a", options=pb.GenerationOptions(
        parameters=pb.DiffusionParameters(t_min=0.9, t_max=0.5))), "options.parameters.t_max"),
    ("Generate", pb.GenerateRequest(text="a", max_new_tokens=0), "max_new_tokens"),
    ("Generate", pb.GenerateRequest(text="a", options=pb.GenerationOptions(num_variations=99)),
     "options.num_variations"),
    ("Generate", pb.GenerateRequest(text="a", model="gpt-x"), "model"),
    ("Generate", pb.GenerateRequest(text="a", request_id="has space"), "request_id"),
    ("Generate", pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="robot", content="x")])),
     "chat.messages[0].role"),
    ("Infill", pb.InfillRequest(prefix="a", suffix="b", gap_tokens=0), "gap_tokens"),
    ("Edit", pb.EditRequest(text="abc", editable=[pb.Span(start=2, end=9)]), "editable"),
    ("Template", pb.TemplateRequest(skeleton='{"a": {{a:float:2}}}'), "skeleton"),
])
def test_bad_input_is_invalid_argument_naming_the_field_and_server_keeps_serving(server, method, request_, field):
    with pytest.raises(grpc.RpcError) as e:
        call(server, method, request_)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(field), e.value.details()
    assert "Traceback" not in e.value.details() and ".py" not in e.value.details()
    assert call(server, "Generate", pb.GenerateRequest(text="a", max_new_tokens=8, options=FAST)).choices


def test_temperature_zero_is_repeatable_across_seeds(server):
    def tokens(temperature: float, seed: int) -> list[int]:
        params = pb.DiffusionParameters(max_denoising_steps=6, temperature=temperature)
        r = call(server, "Generate", pb.GenerateRequest(text="def ", max_new_tokens=64, options=pb.GenerationOptions(
            parameters=params, seed=seed)))
        return list(r.choices[0].token_ids)

    greedy = tokens(0.0, 1)
    assert tokens(0.0, 2) == tokens(0.0, 987654) == greedy
    assert tokens(1.0, 1) != tokens(1.0, 2)  # the same request sampling does depend on the seed
    with pytest.raises(grpc.RpcError) as e:
        tokens(2.5, 1)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "options.parameters.temperature" in e.value.details()
