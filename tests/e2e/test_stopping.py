"""The hard token cap, stop sequences, stop token ids and ignore_eos of Generate and GenerateStream, against a
real front and a real Triton serving the embedded model (canvases of 64 tokens)."""

from __future__ import annotations

import grpc
import pytest

from service.api.diffusiongemma.v1 import diffusiongemma_pb2 as pb
from service.text.tokenizer import load_tokenizer

PARAMS = pb.DiffusionParameters(max_denoising_steps=6)
CANVAS = 64


def generate(server, text: str = "def ", **kw) -> pb.GenerateResponse:
    kw.setdefault("options", pb.GenerationOptions(parameters=PARAMS, seed=3))
    return server.stub().Generate(pb.GenerateRequest(text=text, **kw), metadata=server.metadata(), timeout=120)


def stream(server, **kw) -> list[pb.GenerateStreamResponse]:
    kw.setdefault("options", pb.GenerationOptions(parameters=PARAMS, seed=3))
    return list(server.stub().GenerateStream(pb.GenerateRequest(text="def ", **kw), metadata=server.metadata(),
                                             timeout=120))


def non_pad(ids) -> int:
    return sum(t != 0 for t in ids)


@pytest.fixture(scope="module")
def full(server) -> pb.GenerateResponse:
    """Three whole canvases of seed 3, EOS ignored: what the stopped requests below are cut from."""
    r = generate(server, max_new_tokens=3 * CANVAS, ignore_eos=True)
    assert len(r.choices[0].token_ids) == 3 * CANVAS and len(r.choices[0].stats.steps_per_canvas) == 3
    return r


def test_max_new_tokens_is_a_hard_cap_cutting_the_last_canvas(server):
    r = generate(server, max_new_tokens=16, ignore_eos=True,
                 options=pb.GenerationOptions(parameters=PARAMS, seed=3, num_variations=2))
    for c in r.choices:
        assert len(c.token_ids) == 16 and c.finish_reason == pb.FINISH_REASON_LENGTH
        assert len(c.stats.steps_per_canvas) == 1
    assert r.usage.completion_tokens == sum(non_pad(c.token_ids) for c in r.choices)
    plain = generate(server, max_new_tokens=16)  # EOS not ignored: it may end earlier, never later
    assert len(plain.choices[0].token_ids) <= 16
    assert plain.choices[0].finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS)


def test_cap_cuts_the_same_tokens_the_uncut_request_generates(server, full, model_dir):
    r = generate(server, max_new_tokens=CANVAS + 10, ignore_eos=True)
    c = r.choices[0]
    assert list(c.token_ids) == list(full.choices[0].token_ids[:CANVAS + 10])
    assert c.text == load_tokenizer(model_dir).decode(list(c.token_ids))
    assert len(c.stats.steps_per_canvas) == 2 and r.usage.completion_tokens == non_pad(c.token_ids)


def _stop_at(text: str, starts: range) -> tuple[str, int]:
    """A 4-character string whose first occurrence in `text` starts in `starts`, and where it starts."""
    for at in starts:
        cand = text[at:at + 4]
        if len(cand) == 4 and cand.strip() and text.find(cand) == at:
            return cand, at
    pytest.fail("no stop string candidate")


def _stop_in_second_canvas(text: str, tok, ids: list[int]) -> tuple[str, int]:
    start, end = len(tok.decode(ids[:CANVAS])), len(tok.decode(ids[:2 * CANVAS]))
    return _stop_at(text, range(start + 1, end - 4))


def test_stop_sequence_cuts_the_text_and_generates_no_later_canvas(server, full, model_dir):
    tok = load_tokenizer(model_dir)
    whole = full.choices[0]
    stop, at = _stop_in_second_canvas(whole.text, tok, list(whole.token_ids))
    r = generate(server, max_new_tokens=3 * CANVAS, ignore_eos=True, stop=["never-there", stop])
    c = r.choices[0]
    assert c.text == whole.text[:at] and c.finish_reason == pb.FINISH_REASON_STOP and c.stop_sequence == stop
    assert list(c.stats.steps_per_canvas) == list(whole.stats.steps_per_canvas[:2])  # no third canvas
    assert c.stats.decoder_passes == sum(whole.stats.steps_per_canvas[:2])
    # ids: through the token that completed the stop sequence, no further
    assert list(c.token_ids) == list(whole.token_ids[:len(c.token_ids)])
    assert stop in tok.decode(list(c.token_ids)) and stop not in tok.decode(list(c.token_ids[:-1]))
    assert r.usage.completion_tokens == non_pad(c.token_ids)


def test_stream_holds_back_a_stop_sequence_across_canvases(server, full, model_dir):
    """A stop sequence that begins in the second canvas and ends in the third: the second canvas's event holds
    its start back, and nothing of it (or after it) is ever sent."""
    tok = load_tokenizer(model_dir)
    whole = full.choices[0]
    boundary = len(tok.decode(list(whole.token_ids[:2 * CANVAS])))
    stop, at = _stop_at(whole.text, range(boundary - 3, boundary))
    events = stream(server, max_new_tokens=3 * CANVAS, ignore_eos=True, stop=[stop])
    canvases = [e.canvas for e in events if e.HasField("canvas")]
    final = events[-1].final.choices[0]
    assert len(canvases) == 3 and final.finish_reason == pb.FINISH_REASON_STOP
    assert final.text == whole.text[:at]
    released = "".join(c.text for c in canvases[:2])
    assert final.text.startswith(released) and len(released) <= at < boundary  # held back before the 3rd canvas
    assert "".join(c.text for c in canvases) == final.text  # the rest came with the canvas that ended it
    assert [t for c in canvases for t in c.token_ids] == list(final.token_ids)
    assert events[-1].final.usage.completion_tokens == non_pad(final.token_ids)


def test_stop_token_id_ends_the_output_at_it(server, full):
    ids = list(full.choices[0].token_ids)
    k = next(k for k in range(CANVAS, 2 * CANVAS) if ids[k] not in ids[:k])
    r = generate(server, max_new_tokens=3 * CANVAS, ignore_eos=True, stop_token_ids=[ids[k]])
    c = r.choices[0]
    assert list(c.token_ids) == ids[:k + 1] and c.finish_reason == pb.FINISH_REASON_STOP
    assert c.stop_token_id == ids[k] and len(c.stats.steps_per_canvas) == 2


def test_ignore_eos_runs_to_the_cap_where_eos_would_end_it(server):
    """A seed where the model writes EOS before the cap: with ignore_eos the same seed runs to max_new_tokens."""
    prompt = "x = 1\n"  # the embedded model ends this one at an EOS for some seeds
    for seed in range(16):
        options = pb.GenerationOptions(parameters=PARAMS, seed=seed)
        plain = generate(server, prompt, max_new_tokens=3 * CANVAS, options=options).choices[0]
        if plain.finish_reason == pb.FINISH_REASON_EOS:
            break
    else:
        pytest.fail("no seed ended at an EOS")
    ignored = generate(server, prompt, max_new_tokens=3 * CANVAS, options=options, ignore_eos=True).choices[0]
    assert ignored.finish_reason == pb.FINISH_REASON_LENGTH and len(ignored.token_ids) == 3 * CANVAS
    assert len(ignored.stats.steps_per_canvas) == 3 > len(plain.stats.steps_per_canvas)
    assert 0 not in ignored.token_ids[len(plain.token_ids) - CANVAS:len(plain.token_ids)]  # no pad after its EOS


@pytest.mark.parametrize("kw, field", [
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    (dict(stop=["ok", ""]), "stop[1]"),
    (dict(stop=["x" * 257]), "stop[0]"),
    (dict(stop_token_ids=[5, 2048]), "stop_token_ids[1]"),
    (dict(stop_token_ids=[-1]), "stop_token_ids[0]"),
])
def test_bad_stop_settings_are_invalid_argument_naming_the_field(server, kw, field):
    with pytest.raises(grpc.RpcError) as e:
        generate(server, max_new_tokens=16, **kw)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(f"{field}:")
