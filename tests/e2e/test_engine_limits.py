"""The engine's own limits, set by NIM_* variables, hold end to end (front -> Triton -> scheduler)."""

from __future__ import annotations

import time

import grpc
import pytest

from tests.e2e.conftest import Serve
from tests.e2e.test_operations import LONG, SHORT, wait_until


def test_engine_queue_limit_is_resource_exhausted_and_accepted_work_continues(tmp_path):
    # One live canvas, one queued request; the front would admit more, so the engine is what refuses.
    env = {"NIM_MAX_LIVE_CANVASES": "1", "NIM_MAX_QUEUED_REQUESTS": "1", "NIM_MAX_CONCURRENT_REQUESTS": "8"}
    srv = Serve(tmp_path, env, api_key=None)
    running = queued = None
    try:
        running = srv.stub().GenerateStream(LONG, timeout=120)
        assert next(running).HasField("draft")
        queued = srv.stub().GenerateStream(LONG, timeout=120)
        assert wait_until(lambda: srv.metric("dgemma_queue_depth", port=srv.triton_metrics_port) == 1)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            srv.stub().Generate(SHORT, timeout=60)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() - t0 < 2
        assert "Traceback" not in e.value.details() and "/" not in e.value.details()
        assert next(running).HasField("draft")  # the accepted stream goes on
        running.cancel()
        assert next(queued).HasField("draft")  # the queued one takes the freed slot
        queued.cancel()
        assert wait_until(lambda: srv.live_canvases() == 0)
        assert srv.stub().Generate(SHORT, timeout=60).choices
    finally:
        for call in (running, queued):
            if call is not None:
                call.cancel()
        assert srv.stop() == 0
