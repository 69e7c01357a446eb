import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from service.triton.processes import alive, run_processes
from tests.checkpoints import CONFIGS, build_reference, save_checkpoint

# Every process the tests start inherits this: what is left of them at the end is found by it.
RUN_MARK = "PYTEST_DGEMMA_RUN"  # not DGEMMA_*: tests that mimic the image strip those
TRITON_NAMES = (b"tritonserver", b"triton_python_backend_stub")


def pytest_configure(config):
    os.environ.setdefault(RUN_MARK, uuid.uuid4().hex)


def leftover_tritons(wait_s: float = 15.0) -> dict[int, str]:
    """pid -> command line of each tritonserver or backend stub started by this test run and still alive
    after up to `wait_s` (a stop may be under way)."""
    deadline = time.monotonic() + wait_s
    while True:
        found = {}
        for pid in alive(run_processes(f"{RUN_MARK}={os.environ[RUN_MARK]}")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if any(name in cmd.split(b"\0")[0] for name in TRITON_NAMES):
                found[pid] = cmd.replace(b"\0", b" ").decode(errors="replace")[:200]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def pytest_sessionfinish(session, exitstatus):
    """Fail the run when a Triton (server or stub) it started outlived it: on a GPU such an orphan holds the
    model's memory. The leftovers are killed."""
    left = leftover_tritons()
    if not left:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write("\n")
    for pid, cmd in left.items():
        if reporter is not None:
            reporter.write_line(f"LEFT RUNNING by the tests: pid {pid}: {cmd}", red=True)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def ref_and_ckpt(request, tmp_path_factory):
    model = build_reference(request.param, seed=sorted(CONFIGS).index(request.param))
    path = save_checkpoint(model, tmp_path_factory.mktemp(f"ckpt-{request.param}"))
    return request.param, model, path


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory):
    """One small random checkpoint for unit tests."""
    model = build_reference("sliding", seed=11)
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt-unit"))
