"""benchmarks/load_memory.py runs at tiny widths and prints its JSON (ratios not judged: at this size the
process's own first-use allocations dominate)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_load_memory_benchmark_prints_json():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load_memory.py"), "--tiny"], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    for name in ("bf16", "fp8_packed", "fp8_dequantized"):
        assert doc[f"{name}_peak_bytes"] > 0 and doc[f"{name}_ratio"] > 0
    assert doc["bf16_checkpoint_bytes"] > doc["fp8_checkpoint_bytes"] > 0
    assert doc["widths"] == "tiny" and doc["layers"] == 2
