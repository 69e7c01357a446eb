"""The FP8 runtime's scale handling, checked on the CPU (torch._scaled_mm runs there) against dequantized weights.
The CUDA kernels themselves (and F.scaled_grouped_mm) are unverified: no SM89+ GPU here."""

import pytest
import torch

from service import DEFAULT_CHECKPOINT
from service.errors import Unavailable
from service.model.fp8_runtime import FP8Experts, FP8Linear, apply_fp8, fp8_native_reason, quantize_rows
from service.model.loading import load_model, stored_tensors
from service.model.quantized import dequantize_fp8
from tests.quantized_checkpoints import decoder_logits, fp8, write_quantized


def _weights(per_channel: bool):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * torch.linspace(0.1, 2.0, 48).unsqueeze(1)
    return fp8(w, per_channel), torch.randn(5, 3, 64, generator=g)


def test_static_per_tensor_scales():
    q, x = _weights(per_channel=False)
    s = torch.tensor(0.02)
    got = FP8Linear(q["weight"], q["weight_scale"], s)(x)
    xq = (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s  # what the activation quantizer keeps
    want = xq @ dequantize_fp8(q["weight"], q["weight_scale"]).t()
    assert got.shape == (5, 3, 48) and torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_per_channel_weight_with_rowwise_activations():
    q, x = _weights(per_channel=True)
    got = FP8Linear(q["weight"], q["weight_scale"], q["input_scale"])(x)
    xq, sa = quantize_rows(x.reshape(-1, 64))
    want = (xq.float() * sa) @ dequantize_fp8(q["weight"], q["weight_scale"]).t()
    assert torch.allclose(got.reshape(-1, 48), want, rtol=1e-5, atol=1e-5)
    assert (got.reshape(-1, 48) - x.reshape(-1, 64) @ dequantize_fp8(q["weight"], q["weight_scale"]).t()).abs().max() \
        < 0.1 * want.abs().max()  # and near the unquantized activations


def test_whole_model_on_fp8_modules_tracks_the_dequantized_model(tmp_path):
    ckpt = write_quantized(DEFAULT_CHECKPOINT, tmp_path / "q", "FP8")
    cfg, deq = load_model(ckpt, dtype="float32")
    _, native = load_model(ckpt, dtype="float32")
    # The hand-written input_scale (0.01) is no calibration: without it the linears quantize activations per row.
    raw = {k: t for k, t in stored_tensors(ckpt).items() if not k.endswith(".input_scale")}
    assert apply_fp8(native, raw) == cfg.num_layers * (4 + 3 + 1) + 3 - sum(
        1 for layer in native.layers if layer.self_attn.v_proj is None)  # linears + experts per layer, self-cond
    assert all(isinstance(layer.experts, FP8Experts) for layer in native.layers)
    out = decoder_logits([deq, native], cfg)
    err = ((out[1] - out[0]).norm() / out[0].norm()).item()
    assert 0 < err < 0.05  # activations now FP8 too: close to, not equal to, the dequantized model


def test_no_native_fp8_off_cuda():
    assert "CUDA only" in fp8_native_reason("cpu")
    with pytest.raises(Unavailable, match="no FP8 linear"):
        apply_fp8(torch.nn.Sequential(torch.nn.Linear(2, 2)), {})


@pytest.mark.parametrize("cc, refused", [((8, 9), True), ((12, 0), True), ((9, 0), False), ((10, 0), False)])
def test_fp8_engine_refused_on_sm89_and_sm12x(tmp_path, monkeypatch, cc, refused):
    """A faked capability: the loader refuses an FP8 build on a CUDA device without torch._scaled_grouped_mm,
    naming what the card gets instead, before anything is put on the device."""
    from service.model.fp8_runtime import fp8_gpu_refusal

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
    assert (fp8_gpu_refusal("cuda") is not None) == refused
    if refused:
        ckpt = write_quantized(DEFAULT_CHECKPOINT, tmp_path / "q", "FP8")
        with pytest.raises(Unavailable, match="SM90 and SM100 only.*torch-bf16-any"):
            load_model(ckpt, device="cuda")
