"""Checkpoint loading: sharded weights with an index, tied embeddings, the ignored vision tower."""

import logging

import torch

from service.model.loading import load_model
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
