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
    assert waits == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert s.restarts == 1 and not s.restarting
    assert s.metrics.backend_restarts._value.get() == 1
