"""benchmarks/peers.py runs the field's own tools against `dgemma serve` and prints its JSON (`--smoke`: 2 requests
each). Skipped where .venv-peers is absent (`make peers`; CI does not build it: 2 GB, and the tools' numpy>=2
conflicts with the project's pins). What each tool reports, and which fail on fields the server refuses, is
not judged here: only that each tool ran and its entry has the shape the docs describe."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PEERS_VENV = ROOT / ".venv-peers"

pytestmark = pytest.mark.skipif(not (PEERS_VENV / "bin" / "guidellm").exists(),
                                reason="no .venv-peers (the field's tools: `make peers`); CI does not build it")


def test_peers_smoke_prints_each_tools_result():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--smoke"], capture_output=True,
                         text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(doc["tools"]) == {"guidellm", "lm_eval", "langchain", "grpcurl", "genai_perf"}
    for name, tool in doc["tools"].items():
        assert isinstance(tool["ok"], bool), name
        assert tool["ok"] or tool.get("error") or any(r.get("error") for r in tool.get("runs", {}).values()), name
        assert "calls" in tool["server"] and "errors_answered" in tool["server"], name
    # These need nothing the server is still being taught: reflection, Generate, chat invoke and stream.
    assert doc["tools"]["grpcurl"]["ok"], doc["tools"]["grpcurl"]
    assert "diffusiongemma.v1.DiffusionGemma" in doc["tools"]["grpcurl"]["list"]["services"]
    assert doc["tools"]["langchain"]["ok"], doc["tools"]["langchain"]
    assert doc["tools"]["langchain"]["stream"]["chunks"] >= 1
