"""The supervisor's restart policy, with Triton's start stubbed (the e2e tests kill a real one)."""

import asyncio

from service.serve import supervisor as sup
from service.serve.config import serve_options


def test_failed_restarts_back_off_exponentially_and_a_success_is_counted(tmp_path, monkeypatch):
    s = sup.Supervisor(serve_options({"NIM_CACHE_PATH": str(tmp_path)}))
    attempts = []

    def start(*_):
        attempts.append(1)
        if len(attempts) < 6:
            raise RuntimeError("tritonserver did not become ready")

    waits = []

    async def sleep(seconds):
        waits.append(seconds)

    monkeypatch.setattr(s.triton, "start", start)
    monkeypatch.setattr(sup.asyncio, "sleep", sleep)
    asyncio.run(s._restart_triton())
    assert waits == [0.0, 2.0, 4.0, 8.0, 16.0, 30.0]  # the first attempt at once
    assert s.restarts == 1 and not s.restarting
    assert s.metrics.backend_restarts._value.get() == 1


class Clock:
    """The supervisor's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _watched(tmp_path, monkeypatch, beat: dict) -> tuple[sup.Supervisor, Clock]:
    clock = Clock()
    monkeypatch.setattr(sup.time, "monotonic", clock)
    s = sup.Supervisor(serve_options({"NIM_CACHE_PATH": str(tmp_path), "NIM_ENGINE_HEARTBEAT_TIMEOUT": "5"}))
    monkeypatch.setattr(s.triton, "engine_heartbeat", lambda: beat["t"])
    monkeypatch.setattr(s.triton, "alive", lambda: True)
    return s, clock


def test_a_stale_engine_heartbeat_turns_health_off_and_restarts_triton(tmp_path, monkeypatch):
    """The backend stub (or its scheduler) died while tritonserver lives: its heartbeat stops changing."""
    beat = {"t": 1.0}
    s, clock = _watched(tmp_path, monkeypatch, beat)
    assert asyncio.run(s._check_engine()) and s.backend_alive()
    clock.t += 4.5  # the same value, not yet for the timeout
    assert asyncio.run(s._check_engine())
    clock.t += 1.0  # the same value for longer than the timeout
    assert not asyncio.run(s._check_engine()) and not s.backend_alive()
    beat["t"] = 2.0  # it beats again
    assert asyncio.run(s._check_engine())
    beat["t"] = None  # Triton's metrics do not answer: not dead until that lasts the timeout
    clock.t += 4.5
    assert asyncio.run(s._check_engine())
    clock.t += 1.0
    assert not asyncio.run(s._check_engine())

    stops, starts = [], []
    monkeypatch.setattr(s.triton, "stop", lambda timeout=20.0: stops.append(timeout))
    monkeypatch.setattr(s.triton, "start", lambda *a: starts.append(a))
    asyncio.run(s._restart_triton(engine_dead=True))
    assert stops == [0] and len(starts) == 1  # killed at once, started again
    assert s.restarts == 1 and s.metrics.backend_restarts._value.get() == 1 and s.backend_alive()
    beat["t"] = 2.0  # the new Triton's first beat (even an old-looking value) is fresh
    clock.t += 4.5
    assert asyncio.run(s._check_engine())


def test_a_wall_clock_step_does_not_make_a_healthy_engine_look_dead(tmp_path, monkeypatch):
    """The model beats with its wall clock (time.time()), which NTP or an operator may step by an hour either
    way, in its process or in ours: a beating engine stays alive, whatever the two clocks say."""
    wall = {"t": 1_800_000_000.0}
    monkeypatch.setattr(sup.time, "time", lambda: wall["t"])  # our wall clock, should the supervisor read it
    beat = {"t": wall["t"]}
    s, clock = _watched(tmp_path, monkeypatch, beat)
    for step in (-3600.0, 3600.0, 7200.0, -86400.0):
        for _ in range(3):  # one beat a second, polled twice a second
            clock.t += 0.5
            assert asyncio.run(s._check_engine())
            clock.t += 0.5
            beat["t"] += 1.0
            wall["t"] += 1.0
            assert asyncio.run(s._check_engine())
        beat["t"] += step  # the model's clock stepped ...
        wall["t"] -= step  # ... and ours the other way
    assert s.backend_alive()


def test_triton_exiting_is_cleaned_up_before_the_restart(tmp_path, monkeypatch):
    """A Triton that died is stopped (its orphaned stubs killed) before a new one starts."""
    s = sup.Supervisor(serve_options({"NIM_CACHE_PATH": str(tmp_path)}))
    calls = []
    monkeypatch.setattr(s.triton, "stop", lambda timeout=20.0: calls.append(("stop", timeout)))
    monkeypatch.setattr(s.triton, "start", lambda *a: calls.append(("start",)))
    asyncio.run(s._restart_triton())
    assert calls == [("stop", 0), ("start",)]
