"""benchmarks/step_trace.py traces a step of a toy config on the meta device and prints its JSON (the real
shape's figures are in docs/benchmarks.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_step_trace_prints_integer_counts():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_trace.py"), "--small", "--canvases", "1,4"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("weight_bytes_per_step", "host_syncs", "ops_per_step"):
        assert set(doc[key]) == {"1", "4"} and all(isinstance(v, int) and v >= 0 for v in doc[key].values())
    assert doc["weight_bytes_per_step"]["1"] > 0 and doc["ops_per_step"]["1"] > 0
    assert "weight_bytes_ratio_32_to_1" in doc
    assert doc["stop_flag_transfers"] == 1
    assert isinstance(doc["captures"], int) and doc["captures"] >= 0 and doc["trace_steps"] == 200
