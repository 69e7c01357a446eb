"""benchmarks/soak.py --smoke: a few seconds of mixed load on a real `dgemma serve`; its JSON holds no
unexpected status and the engine holds no canvas afterwards."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_soak_smoke_prints_json_with_no_unexpected_status():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--smoke"], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 0, (doc, out.stderr[-2000:])
    assert doc["calls"] > 0 and doc["unexpected"] == 0 and doc["live_canvases_end"] == 0
    assert doc["p50_ms"] > 0 and all(doc["rss_mb"][p]["end"] > 0 for p in ("front", "backend"))
