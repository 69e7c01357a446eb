"""The image's entrypoint command line (ENTRYPOINT + CMD) and HEALTHCHECK, run from the installed package with
the environment the image sets, so that a path, variable or flag that would break in the image fails here.

Only what cannot exist on this machine is replaced, and the test names each replacement: the image's venv
on PATH (this venv instead), the writable paths (a temporary directory) and the listen address and ports
(127.0.0.1 and free ports). Everything else the Dockerfile sets is passed as written.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from service.triton.launcher import free_port
from tests.packaging.dockerfile_spec import image_argv, program_argv, stages

REPLACED = {"PATH", "HOME", "NIM_CACHE_PATH", "NIM_SERVER_HOST", "NIM_SERVER_PORT", "NIM_HTTP_PORT",
            "NIM_METRICS_PORT", "DGEMMA_SERVER"}
BIN = Path(sys.executable).parent


def image_env(tmp: Path) -> dict[str, str]:
    final = stages()[-1]
    written = final.env()
    assert REPLACED <= set(written), "the Dockerfile no longer sets a variable this test replaces"
    port, http, metrics = free_port(), free_port(), free_port()
    replaced = {
        "PATH": written["PATH"].replace("/opt/dgemma/venv/bin", str(BIN)).replace("$PATH", os.environ["PATH"]),
        "HOME": str(tmp / "home"), "NIM_CACHE_PATH": str(tmp / "cache"),
        "NIM_SERVER_HOST": "127.0.0.1", "NIM_SERVER_PORT": str(port), "NIM_HTTP_PORT": str(http),
        "NIM_METRICS_PORT": str(metrics),
        "DGEMMA_SERVER": written["DGEMMA_SERVER"].replace(written["NIM_SERVER_PORT"], str(port)),
    }
    (tmp / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NIM_", "DGEMMA_", "OTEL_"))}
    env.update(written)
    env.update(replaced)
    env.update({"OMP_NUM_THREADS": "1", "NIM_TRITON_LOG_FILE": str(tmp / "triton.log")})
    return env


def test_entrypoint_serves_and_the_healthcheck_passes(tmp_path):
    env = image_env(tmp_path)
    final = stages()[-1]
    argv = program_argv(final)
    assert argv[0] == "dgemma" and (BIN / "dgemma").is_file(), "the console script the image runs"
    cmd = [str(BIN / argv[0]), *argv[1:]]
    # under the image's init too where this machine has it (Debian's tini): SIGTERM and the exit code pass through it
    init = shutil.which(image_argv(final)[0])
    if init:
        cmd = [init, *image_argv(final)[1:-len(argv)], *cmd]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                            stderr=open(tmp_path / "serve.log", "wb"), text=True)
    watchdog = threading.Timer(240, proc.kill)  # bounds the blocking readline below
    watchdog.start()
    try:
        line = proc.stdout.readline()  # printed once Triton is ready and the front listens
        log = (tmp_path / "serve.log").read_text()[-3000:]
        assert f"on gRPC 127.0.0.1:{env['NIM_SERVER_PORT']}" in line, f"{line!r}\n{log}"
        assert f"metrics :{env['NIM_METRICS_PORT']}" in line and f"HTTP :{env['NIM_HTTP_PORT']}" in line
        with urllib.request.urlopen(f"http://127.0.0.1:{env['NIM_HTTP_PORT']}/v1/health/live", timeout=10) as r:
            assert r.status == 200  # the OpenAI-compatible face listens where the image says
        # the rendered model repository and the Triton copy went to NIM_CACHE_PATH, nowhere else
        assert (Path(env["NIM_CACHE_PATH"]) / "model_repository" / "diffusiongemma" / "config.pbtxt").is_file()
        hc = final.exec_form("HEALTHCHECK")
        for _ in range(50):  # health turns SERVING within about a second of the startup line
            done = subprocess.run([str(BIN / hc[0]), *hc[1:]], env=env, capture_output=True, text=True, timeout=30)
            if done.returncode == 0:
                break
            time.sleep(0.2)
        assert done.returncode == 0 and done.stdout.strip() == "SERVING", done
        models = subprocess.run([str(BIN / "dgemma"), "models"], env=env, capture_output=True, text=True, timeout=30)
        assert models.returncode == 0 and models.stdout.startswith("diffusiongemma\t"), models
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0, (tmp_path / "serve.log").read_text()[-3000:]


def test_a_bad_image_setting_fails_here(tmp_path):
    """The same run with a broken variable stops with the variable's name (what the image would print)."""
    env = image_env(tmp_path)
    env["NIM_SERVER_PORT"] = "eight-thousand"
    done = subprocess.run([str(BIN / "dgemma"), "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "NIM_SERVER_PORT" in done.stderr
