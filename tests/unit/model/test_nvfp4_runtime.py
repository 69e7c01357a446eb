"""The NVFP4 runtime, checked on the CPU: e2m1 encoding and packing, the activation quantizer, cuBLAS's swizzled
scale layout, and NVFP4 experts through the emulation of the kernel's operands against the dequantized model. The
Blackwell call itself (F.scaled_mm, BlockWise1x16) is unverified: no SM100 GPU here."""

import pytest
import torch

from service import DEFAULT_CHECKPOINT
from service.errors import Unavailable
from service.model.loading import load_model, stored_tensors
from service.model.nvfp4_runtime import (NVFP4Experts, apply_nvfp4, encode_e2m1, nvfp4_native_reason,
                                         pack_e2m1, quantize_nvfp4, to_blocked)
from service.model.quantized import E2M1_VALUES, dequantize_nvfp4, unpack_e2m1
from tests.quantized_checkpoints import decoder_logits, write_quantized


def test_every_e2m1_value_encodes_to_its_code_and_ties_go_to_even():
    values = torch.tensor(E2M1_VALUES)
    codes = encode_e2m1(values)
    assert codes[:8].tolist() == list(range(8)) and codes[9:].tolist() == list(range(9, 16))
    assert codes[8] == 0  # -0.0 is stored as +0
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -5.0])
    assert torch.tensor(E2M1_VALUES)[encode_e2m1(ties).long()].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0,
                                                                              -1.0, -4.0]
    assert torch.tensor(E2M1_VALUES)[encode_e2m1(torch.tensor([0.3, 2.6, 9.0, -7.0])).long()].tolist() == [
        0.5, 3.0, 6.0, -6.0]  # nearest; saturating at 6


def test_packing_is_the_loaders_byte_layout():
    codes = torch.randint(0, 16, (3, 32), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    packed = pack_e2m1(codes)
    assert packed.shape == (3, 16) and packed[0, 0] == codes[0, 0] | (codes[0, 1] << 4)
    assert torch.equal(unpack_e2m1(packed), torch.tensor(E2M1_VALUES)[codes.long()])


def test_quantizing_nvfp4_values_is_exact_and_other_values_close():
    g = torch.Generator().manual_seed(1)
    # values an NVFP4 tensor holds exactly: codes times e4m3 block scales times a global scale, each block
    # holding a +-6 so that its amax fixes its scale
    codes = torch.randint(0, 16, (8, 64), generator=g).to(torch.uint8)
    codes[:, ::16] = 7
    scales = (torch.rand(8, 4, generator=g) * 300 + 1).to(torch.float8_e4m3fn)
    glob = torch.tensor(0.0125)
    x = dequantize_nvfp4(pack_e2m1(codes), scales, glob)
    packed, got_scales = quantize_nvfp4(x, glob)
    assert torch.equal(got_scales.view(torch.uint8), scales.view(torch.uint8))
    assert torch.equal(dequantize_nvfp4(packed, got_scales, glob), x)
    y = torch.randn(16, 128, generator=g) * 3
    yq = dequantize_nvfp4(*quantize_nvfp4(y, y.abs().max() / (6 * 448)), y.abs().max() / (6 * 448))
    assert (yq - y).norm() / y.norm() < 0.12  # about 20 dB, as 4-bit blocks give
    assert torch.equal(dequantize_nvfp4(*quantize_nvfp4(torch.zeros(2, 16), glob), glob), torch.zeros(2, 16))


def test_swizzled_scales_follow_cublas_tile_layout():
    """cuBLAS's block-scaling-factor layout: a [R, C] scale matrix in 128 x 4 tiles, tile (R/128, C/4) in
    row-major order, and inside a tile the scale of (r, c) at (r % 32) * 16 + (r % 128) // 32 * 4 + c % 4."""
    r, c = 200, 7
    scales = (torch.arange(r * c) % 250 + 1).reshape(r, c).to(torch.uint8).view(torch.float8_e4m3fn)
    flat = to_blocked(scales).view(torch.uint8)
    col_tiles = -(-c // 4)
    assert flat.numel() == 256 * 8
    for i in range(r):
        for j in range(c):
            tile = (i // 128) * col_tiles + j // 4
            at = tile * 512 + (i % 32) * 16 + (i % 128) // 32 * 4 + j % 4
            assert flat[at] == scales.view(torch.uint8)[i, j], (i, j)
    assert int(flat.count_nonzero()) == r * c  # the padding is zeros


def test_nvfp4_experts_emulated_track_the_dequantized_model(tmp_path):
    ckpt = write_quantized(DEFAULT_CHECKPOINT, tmp_path / "q", "NVFP4")
    cfg, deq = load_model(ckpt, dtype="float32")  # W4A16: weights dequantized at load
    _, w4a4 = load_model(ckpt, dtype="float32")
    assert apply_nvfp4(w4a4, stored_tensors(ckpt), emulate=True) == cfg.num_layers
    assert all(isinstance(layer.experts, NVFP4Experts) and not hasattr(layer.experts, "gate_up_proj")
               for layer in w4a4.layers)
    out = decoder_logits([deq, w4a4], cfg)
    err = ((out[1] - out[0]).norm() / out[0].norm()).item()
    # the activations of the experts are now FP4 too: close to, not equal to, the dequantized model (a wrong
    # expert order, gate/up swap or scale layout gives errors of order 1)
    assert 0 < err < 0.1, err
    agree = (out[1].argmax(-1) == out[0].argmax(-1)).float().mean().item()
    assert agree > 0.85, agree


def test_experts_whose_gate_and_up_scales_differ_are_refused():
    e = {f"x.experts.0.{n}.{s}": v for n in ("gate_proj", "up_proj", "down_proj") for s, v in (
        ("weight", torch.zeros(16, 8, dtype=torch.uint8)), ("weight_scale", torch.zeros(16, 1).to(torch.float8_e4m3fn)),
        ("weight_scale_2", torch.tensor(1.0)), ("input_scale", torch.tensor(1.0)))}
    e["x.experts.0.up_proj.weight_scale_2"] = torch.tensor(2.0)
    from service.model.nvfp4_runtime import _expert_tensors
    with pytest.raises(Unavailable, match="different weight_scale_2"):
        _expert_tensors(e, "x.experts", ("gate_proj", "up_proj"), "gate_up")


def test_no_native_nvfp4_off_cuda():
    assert "CUDA only" in nvfp4_native_reason("cpu")
    with pytest.raises(Unavailable, match="no NVFP4 experts"):
        apply_nvfp4(torch.nn.Sequential(torch.nn.Linear(2, 2)), {})


def test_native_nvfp4_experts_say_once_that_they_run_per_expert(tmp_path, caplog):
    """No grouped FP4 GEMM is called: loading for native execution logs one line saying so (emulation does not)."""
    ckpt = write_quantized(DEFAULT_CHECKPOINT, tmp_path / "q", "NVFP4")
    _, model = load_model(ckpt, dtype="float32")
    with caplog.at_level("WARNING", logger="dgemma.model"):
        apply_nvfp4(model, stored_tensors(ckpt), emulate=False)
    lines = [r.getMessage() for r in caplog.records if "per expert" in r.getMessage()]
    assert len(lines) == 1 and "not CUDA-graph captured" in lines[0] and torch.__version__ in lines[0]
    caplog.clear()
    _, model = load_model(ckpt, dtype="float32")
    with caplog.at_level("WARNING", logger="dgemma.model"):
        apply_nvfp4(model, stored_tensors(ckpt), emulate=True)
    assert not [r for r in caplog.records if "per expert" in r.getMessage()]
