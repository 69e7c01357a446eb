"""Checkpoint loading: sharded weights with an index, tied embeddings, the ignored vision tower."""

import logging
import shutil

import pytest
import torch

from service import DEFAULT_CHECKPOINT
from service.errors import CheckpointError
from service.model.fp8_runtime import FP8Experts
from service.model.loading import iter_tensors, load_model
from tests.checkpoints import build_reference


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path, caplog):
    ref = build_reference("sliding", seed=5)
    ref.save_pretrained(tmp_path / "one")
    ref.save_pretrained(tmp_path / "many", max_shard_size="100KB")
    shards = list((tmp_path / "many").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "many" / "model.safetensors.index.json").is_file()
    with caplog.at_level(logging.INFO, logger="service.model.loading"):
        _, a = load_model(tmp_path / "one")
    assert "vision tower" in caplog.text
    _, b = load_model(tmp_path / "many")
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    # tied: our unembedding is the decoder's embedding table
    assert torch.equal(a.embed_tokens.weight, ref.model.decoder.embed_tokens.weight)


def test_dtype_override(tmp_path):
    build_reference("canvas", seed=1).save_pretrained(tmp_path / "c")
    cfg, m = load_model(tmp_path / "c", dtype="bfloat16")
    assert m.embed_tokens.weight.dtype == torch.bfloat16
    assert getattr(m, "inv_freq_0").dtype == torch.float32  # RoPE stays float32


def test_tensor_by_tensor_reader_matches_safetensors(small_ckpt, tmp_path):
    from safetensors.torch import load_file

    from tests.quantized_checkpoints import write_quantized

    fp8 = write_quantized(small_ckpt, tmp_path / "q", "FP8")
    for f in (*small_ckpt.glob("*.safetensors"), fp8 / "model.safetensors"):
        want = load_file(str(f))
        got = dict(iter_tensors(f))
        assert got.keys() == want.keys()
        for k, t in want.items():
            assert got[k].dtype == t.dtype and torch.equal(got[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k


def test_a_truncated_shard_names_the_file(small_ckpt, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(small_ckpt, d)
    f = next(d.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"cannot read {f.name}"):
        load_model(d)
    f.write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match=f"cannot read {f.name}"):
        load_model(d)


def test_loads_straight_into_the_serving_dtype_without_a_float32_copy(small_ckpt, monkeypatch):
    """Every parameter lands in bfloat16, and no float32 tensor of a parameter's size is ever made."""
    made = []
    real = torch.Tensor.to

    def spy(self, *a, **kw):
        out = real(self, *a, **kw)
        if out.dtype == torch.float32 and out.numel() > 64 and out is not self:
            made.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "to", spy)
    _, m = load_model(small_ckpt, dtype="bfloat16")
    monkeypatch.undo()
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in m.parameters())
    assert not any(b.is_meta for b in m.buffers())
    assert made == []  # the checkpoint is float32: each tensor is cast as read, none kept in float32


def test_fp8_build_kept_packed_loads_without_dequantized_experts(tmp_path):
    """keep_quantized: the GPU path's loading, run on the CPU (whose FP8 experts loop per expert)."""
    from tests.quantized_checkpoints import decoder_logits, write_quantized

    # per channel: activations quantized per row (the hand-written static input_scale is no calibration)
    ckpt = write_quantized(DEFAULT_CHECKPOINT, tmp_path / "q", "FP8", per_channel=True)
    cfg, deq = load_model(ckpt, dtype="float32")
    _, packed = load_model(ckpt, dtype="float32", keep_quantized=True)
    assert all(isinstance(layer.experts, FP8Experts) and not hasattr(layer.experts, "gate_up_proj")
               for layer in packed.layers)
    assert not any(t.is_meta for t in (*packed.parameters(), *packed.buffers()))
    out = decoder_logits([deq, packed], cfg)
    assert ((out[1] - out[0]).norm() / out[0].norm()).item() < 0.05
