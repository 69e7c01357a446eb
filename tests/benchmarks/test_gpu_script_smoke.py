"""The GPU benchmark's code path runs (on the CPU, toy shape): it cannot measure anything here."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_real_shape.py"


def test_gpu_benchmark_smoke_runs_on_cpu():
    out = subprocess.run([sys.executable, str(SCRIPT), "--smoke-cpu", "--batches", "1,2", "--steps", "4"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["canvases"] for r in result["results"]] == [1, 2]
    assert "not a measurement" in result["device"]


def test_gpu_benchmark_without_cuda_says_so():
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "no CUDA device" in out.stdout
