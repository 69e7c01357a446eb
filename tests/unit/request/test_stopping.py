"""The request layer's cut of a variation (service/request/stopping.py): stop sequences across canvases, hold-back
of a possible stop's start, stop token ids, the hard cap, and the Dispatcher ending a stopped stream early."""

import asyncio

import pytest

from service import DEFAULT_CHECKPOINT
from service.errors import InvalidArgument
from service.request import jobs
from service.request.catalog import ServedModel
from service.request.dispatch import Dispatcher, usage_of
from service.request.jobs import Job
from service.request.stopping import MAX_STOP, MAX_STOP_CHARS, StopSpec, Stopper, stop_spec
from service.request.triton_client import BackendEvent

PAD, EOS = 0, 1
# a toy vocabulary: id 0 pad and 1 EOS decode to nothing, 2.. to one letter each
LETTERS = "abcdefghijklmnopqrstuvwxyz ."


def decode(ids: list[int]) -> str:
    return "".join(LETTERS[t - 2] for t in ids if t >= 2)


def ids(text: str) -> list[int]:
    return [LETTERS.index(c) + 2 for c in text]


def stopper(max_tokens: int = 1000, stop: tuple[str, ...] = (), stop_ids: tuple[int, ...] = ()) -> Stopper:
    return Stopper(StopSpec(max_tokens, stop, stop_ids), decode, PAD)


def test_stop_across_a_canvas_boundary_is_held_back_then_cut():
    s = stopper(stop=("end.",))
    first = s.feed(ids("hello en"))
    assert first.text == "hello " and not first.done  # "en" may begin "end."
    second = s.feed(ids("d. more"))
    assert second.done and second.finish_reason == "stop" and second.stop_reason == "end."
    assert second.text == ""  # nothing of the stop sequence, nor after it
    assert s.final_text == "hello " and s.ids == ids("hello end.")  # ids through the token completing it


def test_held_back_text_is_released_once_it_cannot_be_a_stop():
    s = stopper(stop=("end.",))
    assert s.feed(ids("the en")).text == "the "
    assert s.feed(ids("try is")).text == "entry is"
    assert s.finish("length") == "" and s.final_text == "the entry is" and s.finish_reason == "length"


def test_earliest_of_several_stops_wins():
    s = stopper(stop=("zz", "b", "cd"))
    cut = s.feed(ids("xacdxbzz"))
    assert cut.done and cut.stop_reason == "cd" and s.final_text == "xa" and s.ids == ids("xacd")


def test_stop_token_id_ends_the_text_before_it_and_keeps_the_id():
    dot = ids(".")[0]
    s = stopper(stop_ids=(dot,))
    assert s.feed(ids("ab")).text == "ab"
    cut = s.feed(ids("c.de"))
    assert cut.done and cut.stop_reason == dot and cut.ids == ids("c.") and cut.text == "c"
    assert s.final_text == "abc" and s.completion_tokens == 4


def test_cap_cuts_mid_canvas_with_finish_length_even_after_an_eos():
    s = stopper(max_tokens=5)
    cut = s.feed(ids("abcdefg") + [EOS, PAD])
    assert cut.ids == ids("abcde") and cut.text == "abcde"
    assert s.finish("eos") == "" and s.finish_reason == "length" and s.completion_tokens == 5


def test_eos_within_the_cap_keeps_finish_eos_and_pads_are_not_counted():
    s = stopper(max_tokens=8)
    s.feed(ids("abc") + [EOS, PAD, PAD, PAD, PAD, PAD, PAD])
    s.finish("eos")
    assert s.finish_reason == "eos" and s.ids == ids("abc") + [EOS, PAD, PAD, PAD, PAD]
    assert s.completion_tokens == 4 and s.final_text == "abc"


def test_stream_pieces_add_up_to_the_final_text():
    s = stopper(stop=("xyz", "stop"))
    pieces = [s.feed(ids(c)).text for c in ("a st", "o", "x", "yx y")]
    pieces.append(s.finish("length"))
    assert "".join(pieces) == s.final_text == "a stoxyx y"


def test_stop_spec_validates_naming_the_field():
    with pytest.raises(InvalidArgument) as e:
        stop_spec(16, ["a"] * (MAX_STOP + 1), vocab_size=10)
    assert e.value.field == "stop"
    with pytest.raises(InvalidArgument) as e:
        stop_spec(16, ["ok", ""], vocab_size=10)
    assert e.value.field == "stop[1]"
    with pytest.raises(InvalidArgument) as e:
        stop_spec(16, ["x" * (MAX_STOP_CHARS + 1)], vocab_size=10)
    assert e.value.field == "stop[0]"
    with pytest.raises(InvalidArgument) as e:
        stop_spec(16, [], [3, 10], vocab_size=10, ids_field="options.stop_token_ids")
    assert e.value.field == "options.stop_token_ids[1]"
    with pytest.raises(InvalidArgument) as e:
        stop_spec(16, ["a"], vocab_size=10, has_tokenizer=False)
    assert e.value.field == "stop"
    assert stop_spec(16, ["a"], [3], vocab_size=10) == StopSpec(16, ("a",), (3,))


# ---- the Dispatcher: a stopped variation's stream is cancelled, the other runs on -----------------------


class ScriptedTriton:
    """Each variation's canvases from a script (the model's real tokenizer decodes them); records how many
    canvases each stream got to send."""

    def __init__(self, canvases: dict[int, list[list[int]]], tok) -> None:
        self.canvases, self.tok, self.sent = canvases, tok, {}

    async def stream(self, inputs, request_id="", **kw):
        v = int(request_id.rsplit("/", 1)[1])
        self.sent[v] = 0
        every: list[int] = []
        for k, c in enumerate(self.canvases[v]):
            self.sent[v] += 1
            every += c
            yield BackendEvent("canvas", c, self.tok.decode(c), k, 3)
            await asyncio.sleep(0.01)
        yield BackendEvent("final", every, self.tok.decode(every), -1, 0,
                           {"generated_tokens": len(every), "decoder_passes": 3 * len(self.canvases[v])}, "length")


@pytest.fixture(scope="module")
def model() -> ServedModel:
    return ServedModel.load(DEFAULT_CHECKPOINT, "diffusiongemma", "torch-float32-cpu")


def test_dispatcher_ends_a_stopped_variation_early_and_cuts_usage(model):
    tok = model.tokenizer
    words = [tok.encode(w, add_bos=False) for w in (" alpha", " beta", " gamma", " delta")]
    script = {0: [words[0], words[1], words[2], words[3]] * 3, 1: [words[0], words[2]]}
    canvases = {v: [c for c in cs] for v, cs in script.items()}
    triton = ScriptedTriton(canvases, tok)
    job = Job("r", [2, 5], jobs.Options(num_variations=2), max_new_tokens=1000,
              stopping=StopSpec(1000, (" gamma",)))

    async def main():
        got: list[tuple[int, BackendEvent]] = []
        async for i, e in Dispatcher(model, triton, 8).run(job):
            got.append((i, e))
        return got

    got = asyncio.run(main())
    finals = {i: e for i, e in got if e.kind == "final"}
    assert finals[0].text == " alpha beta" and finals[0].finish_reason == "stop"
    assert finals[0].stop_reason == " gamma"
    assert finals[0].stats["steps_per_canvas"] == [3, 3, 3]  # the canvases it saw, none after the stop
    assert triton.sent[0] < len(canvases[0])  # its stream was cancelled before the script ran out
    assert finals[1].text == " alpha" and finals[1].finish_reason == "stop"
    streamed = "".join(e.text for i, e in got if i == 0 and e.kind == "canvas") + finals[0].tail
    assert streamed == finals[0].text
    assert usage_of(job, [finals[0], finals[1]]).completion_tokens == len(finals[0].ids) + len(finals[1].ids)


def _lp(n: int, base: float) -> "Logprobs":
    from service.engine.api import Logprobs
    return Logprobs([base - k for k in range(n)], [[k] for k in range(n)], [[base - k] for k in range(n)])


@pytest.mark.parametrize("spec, expected", [
    (dict(stop=("end.",)), "hello end."),  # a stop sequence across the canvases: ids through it
    (dict(max_tokens=6), "hello "),  # the cap inside the first canvas
    (dict(stop_ids=(LETTERS.index("d") + 2,)), "hello end"),  # a stop token, kept as OpenAI counts it
])
def test_logprobs_are_cut_to_the_same_ids(spec, expected):
    s = stopper(**spec)
    canvases = [ids("hello en"), ids("d. more")]
    events = [BackendEvent("canvas", c, decode(c), k, 3, logprobs=_lp(len(c), -k * 10.0)) for k, c in enumerate(canvases)]
    out = [s.on_canvas(ev) for ev in events]
    final = s.on_final(BackendEvent("final", canvases[0] + canvases[1], "", -1, 0,
                                    logprobs=_lp(15, 0.0)))
    for ev in out:
        assert len(ev.logprobs) == len(ev.ids)
    assert decode(final.ids) == expected and len(final.logprobs) == len(final.ids)
    whole = out[0].logprobs.token + (out[1].logprobs.token if out[1].logprobs is not None else [])
    assert final.logprobs.token == whole[:len(final.ids)]
    assert final.logprobs.token[:len(out[0].ids)] == [-k for k in range(len(out[0].ids))]


def test_no_logprobs_asked_none_returned():
    s = stopper(max_tokens=3)
    assert s.on_canvas(BackendEvent("canvas", ids("abcd"), "abcd", 0, 1)).logprobs is None
    assert s.on_final(None).logprobs is None
