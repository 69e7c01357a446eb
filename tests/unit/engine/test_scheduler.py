"""Step-level in-flight batching: batched equals solo, cancellation, admission, small per-canvas state."""

import time

import pytest

from service.engine.api import FinalEvent, Request
from service.engine.scheduler import Limits, Scheduler
from service.engine.registry import create_engine
from service.errors import Cancelled, DeadlineExceeded, Overloaded
from service.sampler.params import GenerationParams, Pins
from tests.checkpoints import build_reference, save_checkpoint


@pytest.fixture(scope="module")
def engine(small_ckpt):
    return create_engine(checkpoint_dir=small_ckpt, batch_invariant=True)  # batched == solo, bit for bit


def drain(sched: Scheduler, max_steps: int = 2000) -> None:
    for _ in range(max_steps):
        if not sched.step():
            return
    raise AssertionError("scheduler did not finish")


def mixed_requests(length: int, sampler: str = "reference") -> list[Request]:
    """Four requests of different settings; `mixed` alternates the samplers."""
    samplers = ["reference", "fast"] * 2 if sampler == "mixed" else [sampler] * 4
    return [
        Request([2, 10, 11, 12], GenerationParams(max_new_tokens=2 * length, max_denoising_steps=5,
                                                  sampler=samplers[0]), seed=1),
        Request([2, 40] * 9, GenerationParams(max_new_tokens=length, max_denoising_steps=9, entropy_bound=0.8,
                                             t_min=0.1, t_max=1.2, sampler=samplers[1]), seed=2, return_drafts=True),
        Request([2, 7], GenerationParams(max_new_tokens=3 * length, max_denoising_steps=3, stability_threshold=0,
                                        confidence_threshold=50.0, sampler=samplers[2]), seed=3),
        Request([2, 99, 98, 97, 96], GenerationParams(max_new_tokens=length, max_denoising_steps=7,
                                                      sampler=samplers[3]), seed=4,
                pins=Pins.from_lists([0, 0, 0, 50, 51], [False, False, False, True, True])),
    ]


@pytest.mark.parametrize("sampler", ["reference", "fast", "mixed"])
def test_batched_outputs_equal_solo_outputs_for_mixed_settings(engine, sampler):
    length = engine.config.canvas_length
    solo = [list(engine.generate(r))[-1] for r in mixed_requests(length, sampler)]
    sched = Scheduler(engine)
    streams = [sched.submit(r) for r in mixed_requests(length, sampler)]
    drain(sched)
    batched = [list(s)[-1] for s in streams]
    for a, b in zip(solo, batched):
        assert isinstance(b, FinalEvent)
        assert b.token_ids == a.token_ids
        assert b.stats.steps_per_canvas == a.stats.steps_per_canvas
    assert batched[0].stats.shared_decoder_passes > 0
    assert sched.decoder_passes < sum(f.stats.decoder_passes for f in batched)


def test_requests_join_at_step_boundaries(engine):
    length = engine.config.canvas_length
    sched = Scheduler(engine)
    first = sched.submit(Request([2, 3], GenerationParams(max_new_tokens=length, max_denoising_steps=6), seed=9))
    sched.step()
    sched.step()
    late = Request([2, 4], GenerationParams(max_new_tokens=length, max_denoising_steps=6), seed=10)
    second = sched.submit(late)
    sched.step()
    assert sched.canvases_in_last_pass == 2
    drain(sched)
    assert list(second)[-1].token_ids == list(engine.generate(late))[-1].token_ids
    assert isinstance(list(first)[-1], FinalEvent)


def test_cancellation_frees_the_slot_within_one_step(engine):
    length = engine.config.canvas_length
    sched = Scheduler(engine)
    p = GenerationParams(max_new_tokens=4 * length, max_denoising_steps=20)
    keep = sched.submit(Request([2, 3], p, seed=1))
    gone = sched.submit(Request([2, 5], p, seed=2, return_drafts=True))
    sched.step()
    assert sched.live_canvases == 2
    bytes_before = sched.live_cache_bytes()
    gone.cancel()
    sched.step()
    assert sched.live_canvases == 1
    assert sched.live_cache_bytes() < bytes_before
    events = []
    while (ev := gone.next_event(timeout=0)) is not None:
        events.append(ev)
    assert isinstance(events[-1], Cancelled)
    drain(sched)
    assert isinstance(list(keep)[-1], FinalEvent)


def test_admission_limits_refuse_clearly_and_keep_serving(engine):
    length = engine.config.canvas_length
    sched = Scheduler(engine, Limits(max_live_canvases=1, max_queue=1))
    p = GenerationParams(max_new_tokens=length, max_denoising_steps=4)
    a = sched.submit(Request([2, 3], p, seed=1))
    with pytest.raises(Overloaded, match="overloaded"):
        sched.submit(Request([2, 4], p, seed=2))
    sched.step()  # a is admitted; the queue has room again
    b = sched.submit(Request([2, 4], p, seed=2))
    with pytest.raises(Overloaded):
        sched.submit(Request([2, 5], p, seed=3))
    assert sched.live_canvases == 1 and sched.queue_depth == 1
    drain(sched)
    assert list(a)[-1].token_ids == list(engine.generate(Request([2, 3], p, seed=1)))[-1].token_ids
    assert isinstance(list(b)[-1], FinalEvent)


def test_deadline_passes_frees_the_request(engine):
    sched = Scheduler(engine)
    s = sched.submit(Request([2, 3], GenerationParams(max_new_tokens=64, max_denoising_steps=30)),
                     deadline=time.monotonic() + 0.05)
    sched.step()
    time.sleep(0.06)
    sched.step()
    assert sched.live_canvases == 0
    with pytest.raises(DeadlineExceeded):
        list(s)


def test_background_thread_serves_concurrent_requests(engine):
    sched = Scheduler(engine).start()
    try:
        length = engine.config.canvas_length
        reqs = mixed_requests(length)
        outs = [list(sched.generate(r))[-1] for r in reqs[:1]]
        streams = [sched.submit(r) for r in reqs]
        finals = [list(s)[-1] for s in streams]
        assert finals[0].token_ids == outs[0].token_ids
    finally:
        sched.stop()


def test_per_canvas_state_does_not_grow_with_the_vocabulary(tmp_path):
    sizes = {}
    for vocab in (384, 6144):
        ckpt = save_checkpoint(build_reference("sliding", seed=3, vocab_size=vocab), tmp_path / f"v{vocab}")
        eng = create_engine(checkpoint_dir=ckpt)
        sched = Scheduler(eng)
        sched.submit(Request([2, 3], GenerationParams(max_new_tokens=16, max_denoising_steps=5), seed=1))
        sched.step()
        sched.step()  # after two steps: canvas, argmax, history and the [L, H] self-conditioning input
        (item,) = sched._live
        assert item.seq.soft is not None
        sizes[vocab] = item.seq.state_nbytes()
    assert sizes[384] == sizes[6144]


def test_an_engine_fault_fails_requests_in_flight_but_not_the_loop(engine, monkeypatch):
    from service.errors import Unavailable

    sched = Scheduler(engine).start()
    try:
        p = GenerationParams(max_new_tokens=16, max_denoising_steps=3)
        real = sched.runner.step
        monkeypatch.setattr(sched.runner, "step", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(Unavailable, match="internal engine error"):
            list(sched.submit(Request([2, 3], p, seed=1)))
        monkeypatch.setattr(sched.runner, "step", real)
        assert isinstance(list(sched.submit(Request([2, 3], p, seed=1)))[-1], FinalEvent)  # still serving
    finally:
        sched.stop()


def test_on_step_sees_the_batch_after_finished_requests_left(engine):
    seen = []
    sched = Scheduler(engine, on_step=lambda: seen.append((sched.live_canvases, sched.queue_depth)))
    sched.submit(Request([2, 9], GenerationParams(max_new_tokens=16, max_denoising_steps=2)))
    while sched.step():
        pass
    assert seen[0] == (1, 0) and seen[-1] == (0, 0)  # the gauges' last word: nothing live, nothing queued
