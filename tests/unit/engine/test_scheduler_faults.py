"""Faults injected into every stage and callback of the scheduler's loop: nothing hangs (every wait is
bounded), every request gets exactly one terminal event, one request's fault fails that request alone,
and the loop goes on serving (issue 17, findings 1, 3 and 4)."""

from __future__ import annotations

import threading
import time

import pytest

from service.engine.api import FinalEvent, Request
from service.engine.registry import create_engine
from service.engine.scheduler import Limits, Scheduler
from service.errors import DeadlineExceeded, DGemmaError, InvalidArgument, Unavailable
from service.sampler.params import GenerationParams

WAIT_S = 30  # the longest any test waits for a request's end


@pytest.fixture(scope="module")
def engine(small_ckpt):
    return create_engine(checkpoint_dir=small_ckpt)


class Recorder:
    """A request's on_event: every item in order; `ended` is set by the first terminal one."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.items: list[object] = []
        self.ended = threading.Event()
        self.fail_on = fail_on  # raise while delivering this item (0-based), as a broken response sender would

    def __call__(self, item: object) -> None:
        self.items.append(item)
        if isinstance(item, (FinalEvent, BaseException)):
            self.ended.set()
        if self.fail_on is not None and len(self.items) == self.fail_on + 1:
            raise RuntimeError("injected on_event fault")

    @property
    def terminals(self) -> list[object]:
        return [x for x in self.items if isinstance(x, (FinalEvent, BaseException))]

    def wait(self) -> object:
        assert self.ended.wait(WAIT_S), "the request never ended (hang)"
        time.sleep(0.05)  # anything delivered after the end would show up here
        assert len(self.terminals) == 1, self.items
        assert self.items[-1] is self.terminals[0], "an event came after the terminal one"
        return self.terminals[0]


def request(seed: int, steps: int = 3, tokens: int = 16) -> Request:
    return Request([2, 3 + seed], GenerationParams(max_new_tokens=tokens, max_denoising_steps=steps), seed=seed)


def still_serves(sched: Scheduler) -> None:
    """A new request finishes, and then every KV block is back in the pool: no fault leaked a request's blocks."""
    rec = Recorder()
    sched.submit(request(99), on_event=rec)
    assert isinstance(rec.wait(), FinalEvent)
    deadline = time.monotonic() + 10
    while sched.live_canvases and time.monotonic() < deadline:  # the final event goes out before the blocks
        time.sleep(0.01)
    assert sched.runner.pool.blocks_in_use() == 0


def once(fn, when=lambda *a, **k: True):
    """`fn` that raises once, on the first call for which `when(*args)` holds."""
    fired = []

    def wrapper(*args, **kwargs):
        if not fired and when(*args, **kwargs):
            fired.append(1)
            raise RuntimeError("injected fault")
        return fn(*args, **kwargs)

    return wrapper


def sequence_fault(engine, monkeypatch, method: str, seed: int) -> None:
    """Make `method` of request `seed`'s Sequence raise once."""
    real_new = engine.new_sequence

    def new_sequence(req):
        seq = real_new(req)
        if req.seed == seed:
            setattr(seq, method, once(getattr(seq, method)))
        return seq

    monkeypatch.setattr(engine, "new_sequence", new_sequence)


# Per-request faults: the faulty request (seed 1) ends with one error; the others finish normally.
PER_REQUEST = ["new_sequence", "new_cache", "begin_canvas", "step_input", "stop_flags", "after_step",
               "cancel_check", "on_event"]


@pytest.mark.parametrize("stage", PER_REQUEST)
def test_a_fault_in_one_request_fails_it_alone(engine, monkeypatch, stage):
    sched = Scheduler(engine)
    recs = [Recorder(fail_on=0 if stage == "on_event" and i == 1 else None) for i in range(3)]
    cancel_checks = {}
    if stage == "new_sequence":
        monkeypatch.setattr(engine, "new_sequence", once(engine.new_sequence, lambda r: r.seed == 1))
    elif stage == "new_cache":
        monkeypatch.setattr(sched.runner, "new_cache", once(sched.runner.new_cache))
    elif stage in ("begin_canvas", "step_input", "stop_flags", "after_step"):
        sequence_fault(engine, monkeypatch, stage, seed=1)
    elif stage == "cancel_check":
        cancel_checks[1] = once(lambda: False)
    for i, rec in enumerate(recs):  # all queued before the loop starts: they share the faulty step
        sched.submit(request(i, steps=4), on_event=rec, cancel_check=cancel_checks.get(i))
    sched.start()
    try:
        ends = [rec.wait() for rec in recs]
        faulty = 0 if stage == "new_cache" else 1  # the first cache made is the first request's
        for i, end in enumerate(ends):
            if i == faulty:
                assert isinstance(end, DGemmaError), (stage, end)
            else:
                assert isinstance(end, FinalEvent), (stage, i, end)
        still_serves(sched)
    finally:
        sched.stop(timeout=10)


@pytest.mark.parametrize("stage", ["prefill", "step"])
def test_a_failing_network_pass_fails_its_requests_once_and_the_loop_goes_on(engine, monkeypatch, stage):
    sched = Scheduler(engine)
    calls = {"n": 0}
    real = getattr(sched.runner, stage)

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # a later pass, so that some requests have events already
            raise RuntimeError("injected network fault")
        return real(*args, **kwargs)

    monkeypatch.setattr(sched.runner, stage, flaky)
    recs = [Recorder() for _ in range(3)]
    for i, rec in enumerate(recs):
        sched.submit(request(i, steps=3, tokens=48), on_event=rec)
    sched.start()
    try:
        ends = [rec.wait() for rec in recs]
        assert any(isinstance(e, Unavailable) for e in ends)
        still_serves(sched)
    finally:
        sched.stop(timeout=10)


def test_a_request_that_finished_never_gets_an_error_afterwards(engine, monkeypatch):
    """Finding 3: a short request finishes in the very step in which another request's sampling fails;
    before, the failure reached every canvas of the batch, the finished one too."""
    sched = Scheduler(engine)
    sequence_fault(engine, monkeypatch, "after_step", seed=1)
    short, faulty = Recorder(), Recorder()
    sched.submit(Request([2, 3], GenerationParams(max_new_tokens=16, max_denoising_steps=1), seed=0), on_event=short)
    sched.submit(request(1, steps=4), on_event=faulty)
    sched.start()
    try:
        assert isinstance(short.wait(), FinalEvent)
        assert isinstance(faulty.wait(), DGemmaError)
    finally:
        sched.stop(timeout=10)


def test_a_fault_outside_the_step_never_kills_the_loop(engine, monkeypatch):
    """Finding 1: `_drop_finished` raising (here: itself, once) used to end the thread; streams then hung."""
    sched = Scheduler(engine)
    monkeypatch.setattr(sched, "_drop_finished", once(sched._drop_finished))
    sched.start()
    try:
        stream = sched.submit(request(0))
        got = list_with_timeout(stream)
        assert isinstance(got, Unavailable)  # failed by the guard, once
        assert sched.alive
        still_serves(sched)
    finally:
        sched.stop(timeout=10)


def list_with_timeout(stream) -> object:
    """The stream's terminal item (its error, or its FinalEvent), waiting at most WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        item = stream.next_event(timeout=0.5)
        if isinstance(item, (FinalEvent, BaseException)):
            return item
    raise AssertionError("the stream never ended (hang)")


class Fatal(BaseException):
    """Not an Exception: nothing in the loop catches it, as with a fault that kills the thread."""


def test_a_dead_scheduler_thread_is_seen_and_no_stream_waits_forever(engine, monkeypatch):
    sched = Scheduler(engine)

    def die(*_):
        raise Fatal()

    monkeypatch.setattr(sched, "_admit", die)
    stream = sched.submit(request(0))
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the thread's death is expected here
    sched.start()
    with pytest.raises(Unavailable):
        for _ in stream:  # iteration itself is bounded: it sees the dead engine
            pass
    assert not sched.alive
    with pytest.raises(Unavailable, match="stopped"):
        sched.submit(request(1))
    sched.stop(timeout=5)


def test_server_side_caps_refuse_and_expire(engine):
    """Finding 4: NIM_MAX_NEW_TOKENS_LIMIT / NIM_MAX_DENOISING_STEPS_LIMIT refuse naming the field;
    NIM_MAX_REQUEST_SECONDS ends a request that brought no deadline (or a longer one)."""
    sched = Scheduler(engine, Limits(max_new_tokens=32, max_denoising_steps=8, max_request_seconds=0.0))
    with pytest.raises(InvalidArgument) as e:
        sched.submit(request(0, tokens=48))
    assert e.value.field == "max_new_tokens"
    with pytest.raises(InvalidArgument) as e:
        sched.submit(request(0, steps=9))
    assert e.value.field == "max_denoising_steps"
    far = time.monotonic() + 3600
    stream = sched.submit(request(0), deadline=far)
    assert stream.deadline < far
    sched.step()
    assert isinstance(stream.next_event(timeout=1), DeadlineExceeded)


def test_a_deadline_drops_the_request_at_the_next_step(engine):
    sched = Scheduler(engine)
    stream = sched.submit(request(0, steps=200, tokens=64), deadline=time.monotonic() + 0.3)
    sched.start()
    try:
        assert isinstance(list_with_timeout(stream), DeadlineExceeded)
        assert sched.live_canvases == 0
    finally:
        sched.stop(timeout=10)


def test_a_hung_step_is_reported_while_the_thread_stays_alive(engine, monkeypatch):
    """A decoder pass that does not return (a hung kernel): `alive` stays true, so only the step's age
    shows it. `fault()` names it past the step timeout, which stops the model's heartbeat."""
    sched = Scheduler(engine)
    entered, release = threading.Event(), threading.Event()
    real = sched.runner.step

    def hanging(*args, **kwargs):
        entered.set()
        assert release.wait(WAIT_S)
        return real(*args, **kwargs)

    monkeypatch.setattr(sched.runner, "step", hanging)
    assert sched.step_seconds() == 0.0 and sched.fault(0.2) is None
    rec = Recorder()
    sched.submit(request(0, steps=2), on_event=rec)
    sched.start()
    try:
        assert entered.wait(WAIT_S)
        time.sleep(0.4)
        assert sched.alive and sched.step_seconds() >= 0.4
        assert sched.fault(None) is None and sched.fault(60.0) is None
        assert "a denoising step has run for" in (sched.fault(0.2) or "")
        release.set()
        assert isinstance(rec.wait(), FinalEvent)
        assert sched.step_seconds() < 0.2 and sched.fault(0.2) is None  # between steps: healthy again
    finally:
        release.set()
        sched.stop(timeout=10)
