"""benchmarks/front_overhead.py and http_overhead.py run and print their JSON (a couple of requests; numbers are
not judged)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_front_overhead_benchmark_prints_json():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "front_overhead.py"), "--requests", "2",
                          "--steps", "2"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["requests"] == 2 and doc["front_p50_ms"] > 0 and doc["triton_p50_ms"] > 0


def test_http_overhead_benchmark_prints_json():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "http_overhead.py"), "--requests", "2",
                          "--steps", "2", "--light", "3"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["requests"] == 2 and doc["http_p50_ms"] > 0 and doc["grpc_p50_ms"] > 0
