"""Where calibration and verification run: the device asked for, and the dtype rule."""

import pytest
import torch

from engine_build import placement
from service import DEFAULT_CHECKPOINT
from service.cli import main
from service.errors import InvalidArgument


def test_parameter_count_reads_the_headers():
    from safetensors.torch import load_file

    tensors = load_file(str(DEFAULT_CHECKPOINT / "model.safetensors"))
    assert placement.parameter_count(DEFAULT_CHECKPOINT) == sum(t.numel() for t in tensors.values())


def test_cpu_float32_for_a_small_source_bf16_for_a_large_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("auto", "cpu"):
        assert placement.choose(device, DEFAULT_CHECKPOINT) == placement.Placement("cpu", torch.float32)
    monkeypatch.setattr(placement, "FLOAT32_MAX_PARAMS", placement.parameter_count(DEFAULT_CHECKPOINT) - 1)
    assert placement.choose("auto", DEFAULT_CHECKPOINT) == placement.Placement("cpu", torch.bfloat16)


def test_a_gpu_runs_bf16_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert placement.choose("auto", DEFAULT_CHECKPOINT) == placement.Placement("cuda", torch.bfloat16)
    assert placement.choose("cpu", DEFAULT_CHECKPOINT).device == "cpu"


@pytest.mark.parametrize("device, expected", [("cuda", "sees no CUDA device"), ("tpu", "not one of auto, cpu, cuda")])
def test_bad_or_missing_device_is_named(monkeypatch, device, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InvalidArgument, match=expected) as e:
        placement.choose(device, DEFAULT_CHECKPOINT)
    assert e.value.field == "--device"


def test_cli_refuses_cuda_without_one_before_any_work(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    assert main(["build", "--profile", "torch-fp32-cpu", "--output", str(out), "--device", "cuda"]) == 2
    assert "dgemma: error: --device: cuda was asked for" in capsys.readouterr().err
    assert not out.exists()
