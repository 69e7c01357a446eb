"""`dgemma list-profiles` on this machine: the real probe, no stubs."""

import json

import pytest
import torch

from service import cli
from service.serve.profiles import PROFILES


def test_list_profiles_marks_cpu_profiles_runnable(capsys):
    if torch.cuda.is_available():
        pytest.skip("asserts what a machine without a GPU can run")
    assert cli.main(["list-profiles", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in out["profiles"]}
    assert out["machine"] == "cpu" and list(rows) == [p.name for p in PROFILES]
    assert {n for n, r in rows.items() if r["runnable"]} == {"torch-fp32-cpu", "torch-bf16-any"}
    assert "no CUDA" in rows["torch-fp8-hopper"]["runnable_reason"]
    assert all(r["buildable"] for r in rows.values())  # make test installs ModelOpt: every profile builds on a CPU
    assert all(rows[p.name]["id"] == p.id for p in PROFILES)


def test_list_profiles_table(capsys):
    assert cli.main(["list-profiles"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("MODEL PROFILES") and len(lines) == 1 + len(PROFILES)
    fp32 = next(ln for ln in lines if "(torch-fp32-cpu)" in ln)
    assert PROFILES[0].id in fp32 and "run: yes" in fp32
