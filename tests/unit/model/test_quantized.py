"""Quantized checkpoints: the FP8 and NVFP4 formats dequantize exactly, and load_model loads them."""

import json

import pytest
import torch

from service import DEFAULT_CHECKPOINT
from service.errors import CheckpointError
from service.model.loading import load_model
from service.model.quantized import (
    dequantize_fp8,
    dequantize_nvfp4,
    dequantize_state,
    fuse_experts,
    read_quant_config,
    unpack_e2m1,
)
from tests.quantized_checkpoints import write_quantized


def test_fp8_per_tensor_and_per_channel():
    w = torch.tensor([[1.0, -2.0], [0.5, 4.0]]).to(torch.float8_e4m3fn)
    assert torch.equal(dequantize_fp8(w, torch.tensor(0.5)), torch.tensor([[0.5, -1.0], [0.25, 2.0]]))
    per_row = torch.tensor([2.0, 3.0])
    assert torch.equal(dequantize_fp8(w, per_row), torch.tensor([[2.0, -4.0], [1.5, 12.0]]))
    assert torch.equal(dequantize_fp8(w, per_row.reshape(2, 1)), dequantize_fp8(w, per_row))
    with pytest.raises(CheckpointError, match="per-channel"):
        dequantize_fp8(w, torch.ones(3))


def test_e2m1_nibbles_low_first():
    # byte 0x9F: low nibble 0xF (-6), high nibble 0x9 (-0.5); byte 0x62: 1.0 (code 2), then 4.0 (code 6)
    assert unpack_e2m1(torch.tensor([[0x9F, 0x62]], dtype=torch.uint8)).tolist() == [[-6.0, -0.5, 1.0, 4.0]]


def test_nvfp4_block_and_global_scales():
    codes = torch.arange(32, dtype=torch.uint8).reshape(1, 32) % 16  # two blocks of 16 values
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    block = torch.tensor([[2.0, 0.5]]).to(torch.float8_e4m3fn)
    got = dequantize_nvfp4(packed, block, torch.tensor(3.0))
    values = unpack_e2m1(packed)[0]
    assert torch.equal(got[0, :16], values[:16] * 6.0) and torch.equal(got[0, 16:], values[16:] * 1.5)
    with pytest.raises(CheckpointError, match="expected \\(1, 2\\)"):
        dequantize_nvfp4(packed, block[:, :1], torch.tensor(3.0))


def test_state_dequantizes_and_refuses_orphans():
    w8 = torch.ones(2, 2).to(torch.float8_e4m3fn)
    state = {"a.weight": w8, "a.weight_scale": torch.tensor(0.5), "a.input_scale": torch.tensor(1.0),
             "norm.weight": torch.ones(2)}
    out = dequantize_state(state)
    assert sorted(out) == ["a.weight", "norm.weight"] and out["a.weight"].dtype == torch.float32
    with pytest.raises(CheckpointError, match="b.weight is quantized"):
        dequantize_state({"b.weight": w8})


def test_experts_fuse_gate_rows_first():
    t = {f"l.experts.{e}.{n}.weight": torch.full((2, 3), float(e * 10 + i))
         for e in range(2) for i, n in enumerate(("gate_proj", "up_proj", "down_proj"))}
    out = fuse_experts(t)
    assert out["l.experts.gate_up_proj"].shape == (2, 4, 3)
    assert out["l.experts.gate_up_proj"][1, :, 0].tolist() == [10, 10, 11, 11]
    assert out["l.experts.down_proj"][1, 0, 0] == 12
    del t["l.experts.1.up_proj.weight"]
    with pytest.raises(CheckpointError, match="incomplete"):
        fuse_experts(t)


def test_quant_config_errors_name_the_file(tmp_path):
    assert read_quant_config(tmp_path) is None
    (tmp_path / "hf_quant_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="hf_quant_config.json is malformed"):
        read_quant_config(tmp_path)
    (tmp_path / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "W4A16_AWQ"}}))
    with pytest.raises(CheckpointError, match="W4A16_AWQ"):
        read_quant_config(tmp_path)


@pytest.mark.parametrize("algo, per_channel, tolerance", [("FP8", False, 0.07), ("FP8", True, 0.07),
                                                          ("NVFP4", False, 0.2)])
def test_load_model_dequantizes_a_checkpoint(tmp_path, algo, per_channel, tolerance):
    """Every weight of the loaded model is within the format's rounding of the float model's."""
    write_quantized(DEFAULT_CHECKPOINT, tmp_path / "q", algo, per_channel)
    _, ref = load_model(DEFAULT_CHECKPOINT, dtype="float32")
    _, got = load_model(tmp_path / "q", dtype="float32")
    ref_state, got_state = ref.state_dict(), got.state_dict()
    changed = 0
    for name, r in ref_state.items():
        g = got_state[name]
        assert g.dtype == r.dtype and g.shape == r.shape, name
        err = ((g - r).norm() / r.norm().clamp(min=1e-12)).item()
        assert err <= tolerance, (name, err)
        changed += err > 0
    assert changed >= 4 * 2  # experts of >= 4 layers changed: a loader ignoring the scales fails above
