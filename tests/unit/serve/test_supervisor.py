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


def test_a_stale_engine_heartbeat_turns_health_off_and_restarts_triton(tmp_path, monkeypatch):
    """The backend stub (or its scheduler) died while tritonserver lives: its heartbeat stops advancing."""
    import time

    s = sup.Supervisor(serve_options({"NIM_CACHE_PATH": str(tmp_path), "NIM_ENGINE_HEARTBEAT_TIMEOUT": "5"}))
    beat = {"t": time.time()}
    monkeypatch.setattr(s.triton, "engine_heartbeat", lambda: beat["t"])
    monkeypatch.setattr(s.triton, "alive", lambda: True)
    assert asyncio.run(s._check_engine()) and s.backend_alive()
    beat["t"] = time.time() - 6  # the last beat is older than the timeout
    assert not asyncio.run(s._check_engine()) and not s.backend_alive()
    beat["t"] = None  # Triton's metrics do not answer: not dead until that lasts the timeout
    s._last_beat = time.monotonic()
    assert asyncio.run(s._check_engine())
    s._last_beat = time.monotonic() - 6
    assert not asyncio.run(s._check_engine())

    stops, starts = [], []
    monkeypatch.setattr(s.triton, "stop", lambda timeout=20.0: stops.append(timeout))
    monkeypatch.setattr(s.triton, "start", lambda *a: starts.append(a))
    asyncio.run(s._restart_triton(engine_dead=True))
    assert stops == [0] and len(starts) == 1  # killed at once, started again
    assert s.restarts == 1 and s.metrics.backend_restarts._value.get() == 1 and s.backend_alive()
