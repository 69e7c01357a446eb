"""A `dgemma serve` with small front limits, shared by the reliability tests that leave it SERVING."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Serve

PROMPT_BYTES, MESSAGE_BYTES, CONCURRENT_RPCS, BODY_TIMEOUT_S = 8192, 65536, 16, 2
LIMITS_ENV = {"NIM_HTTP_BODY_TIMEOUT": str(BODY_TIMEOUT_S), "NIM_MAX_PROMPT_BYTES": str(PROMPT_BYTES), "NIM_GRPC_MAX_MESSAGE_BYTES": str(MESSAGE_BYTES),
              "NIM_MAX_CONCURRENT_RPCS": str(CONCURRENT_RPCS), "NIM_MAX_CONCURRENT_REQUESTS": "32",
              "NIM_STREAM_BUFFER": "8", "NIM_LOG_LEVEL": "WARNING", "NIM_SHUTDOWN_DRAIN_DELAY": "0"}


@pytest.fixture(scope="package")  # stopped once tests/reliability is done
def limited_server(tmp_path_factory):
    srv = Serve(tmp_path_factory.mktemp("limited"), LIMITS_ENV, api_key=None)
    yield srv
    assert srv.stop() == 0
