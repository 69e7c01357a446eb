"""benchmarks/fp8_scaling.py runs and prints its JSON (one prompt, a short calibration; numbers not judged)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_fp8_scaling_benchmark_prints_json():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fp8_scaling.py"), "--prompts", "1",
                          "--calibration-prompts", "1", "--calibration-steps", "2"], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    for scaling in ("per-tensor", "per-channel"):
        assert 0 <= doc[scaling]["token_agreement"] <= 1 and doc[scaling]["mean_kl"] >= 0
