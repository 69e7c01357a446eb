"""`dgemma serve --triton-only` as a user runs it: a real Triton on 127.0.0.1, stopped by SIGTERM."""

import os
import signal
import subprocess
import sys
import time

import tritonclient.grpc as grpcclient

from service.triton.launcher import free_port
from service.triton.repository import MODEL_NAME


def test_serve_triton_only_then_sigterm(small_ckpt, tmp_path):
    grpc, http, metrics = free_port(), free_port(), free_port()
    env = {**os.environ, "NIM_CACHE_PATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--triton-only", "--checkpoint", str(small_ckpt),
         "--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(metrics), "--threads", "1"],
        env=env, stdout=subprocess.PIPE, stderr=open(tmp_path / "serve.log", "wb"), text=True,  # the log: Triton's too
    )
    try:
        line = proc.stdout.readline()  # printed once Triton and the model are ready
        assert "serving diffusiongemma" in line, (line, (tmp_path / "serve.log").read_text()[-3000:])
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
        assert client.is_model_ready(MODEL_NAME)
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_without_a_checkpoint_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--triton-only", "--checkpoint",
                          str(tmp_path / "none")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "checkpoint" in out.stderr and "Traceback" not in out.stderr
    for name, value in (("NIM_MODEL_PROFILE", "torch-int3-cpu"), ("NIM_SERVER_PORT", "eighty"),
                        ("NIM_SSL_MODE", "MTLS"), ("NIM_API_KEYS_FILE", str(tmp_path / "missing"))):
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "service.cli", "serve"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, name: value, "NIM_CACHE_PATH": str(tmp_path)})
        assert out.returncode == 2 and name in out.stderr and time.monotonic() - t0 < 60, (name, out.stderr)
        assert "Traceback" not in out.stderr


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        pids.append(int(d))
            except OSError:
                pass
    return pids


def test_sigterm_during_startup_stops_cleanly(small_ckpt, tmp_path):
    """SIGTERM while Triton is still loading the model (the front answers NOT_SERVING, no startup line yet): the
    start-up stops, Triton and its stub are stopped too, and the process exits 0."""
    import grpc as grpclib
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = free_port()
    env = {**os.environ, "NIM_CACHE_PATH": str(tmp_path), "OMP_NUM_THREADS": "1", "NIM_SERVER_PORT": str(port),
           "NIM_HTTP_PORT": str(free_port()), "NIM_METRICS_PORT": str(free_port()), "NIM_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--checkpoint", str(small_ckpt),
                             "--threads", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with grpclib.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            deadline = time.monotonic() + 60
            while True:  # the front is up first, NOT_SERVING while Triton loads
                assert time.monotonic() < deadline and proc.poll() is None
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    break
                except grpclib.RpcError:
                    time.sleep(0.05)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        proc.send_signal(signal.SIGTERM)
        code, out = proc.wait(60), proc.stdout.read()
        assert code == 0, out
        assert "serving diffusiongemma" not in out and "Traceback" not in out  # it never finished starting
        deadline = time.monotonic() + 20
        while _processes_mentioning(str(tmp_path)) and time.monotonic() < deadline:
            time.sleep(0.2)  # Triton and its stub, run with this cache dir, are gone
        assert _processes_mentioning(str(tmp_path)) == []
    finally:
        if proc.poll() is None:
            proc.kill()
