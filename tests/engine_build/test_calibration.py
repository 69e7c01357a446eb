"""Calibration prompt sets and the calibration loop (no ModelOpt: a stand-in model records the calls)."""

import json

import pytest
import torch

from engine_build.calibration import (CalibrationSettings, builtin_prompts, forward_loop, heldout_prompts,
                                      read_prompt_file)
from service.errors import InvalidArgument


def test_builtin_and_heldout_sets_are_disjoint_and_hashed():
    calib = builtin_prompts()
    assert calib.source == "builtin" and len(calib.prompts) >= 16
    held = heldout_prompts()
    assert held and not set(held) & set(calib.prompts)
    assert calib.record() == {"sha256": calib.sha256, "prompts": len(calib.prompts), "source": "builtin"}


def test_prompt_file_one_per_line_and_jsonl(tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("def f():\n\n  import os  \n")
    got = read_prompt_file(txt)
    assert got.prompts == ("def f():", "  import os  ") and got.source == "prompts.txt"
    jl = tmp_path / "prompts.jsonl"
    jl.write_text(json.dumps({"prompt": "a\nb"}) + "\n" + json.dumps({"prompt": "c"}) + "\n")
    assert read_prompt_file(jl).prompts == ("a\nb", "c")
    assert read_prompt_file(jl).sha256 != read_prompt_file(txt).sha256


@pytest.mark.parametrize("content, expected", [
    (None, "does not exist"),
    ("", "holds no prompts"),
    ("\n  \n", "holds no prompts"),
])
def test_missing_or_empty_calibration_file(tmp_path, content, expected):
    path = tmp_path / "calib.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InvalidArgument) as e:
        read_prompt_file(path)
    assert e.value.field == "--calibration" and expected in e.value.message


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    with pytest.raises(InvalidArgument, match="calib.jsonl line 2"):
        read_prompt_file(path)


class _Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def generate(self, input_ids, **kw):
        self.calls.append((input_ids.tolist(), kw, torch.rand(1).item()))


def test_forward_loop_runs_the_denoising_loop_per_prompt_seeded():
    model = _Recorder()
    loop = forward_loop([[2, 5], [2, 6, 7]], CalibrationSettings(steps=6, canvases=2), canvas_length=16,
                        eos_ids=[1], pad_id=0)
    loop(model)
    loop(model)
    assert [c[0] for c in model.calls[:2]] == [[[2, 5]], [[2, 6, 7]]]
    kw = model.calls[0][1]
    assert kw["max_new_tokens"] == 32 and kw["max_denoising_steps"] == 6
    assert kw["confidence_threshold"] < 1e-6  # every step runs: no early stop
    assert [c[2] for c in model.calls[:2]] == [c[2] for c in model.calls[2:]]  # seeded per prompt
