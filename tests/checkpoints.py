"""Tiny random DiffusionGemma checkpoints, saved by the reference implementation (`transformers`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

VISION = dict(
    model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=2, head_dim=8,
)

# Three shapes the parity tests cover.
CONFIGS = {
    # sliding window (8) shorter than the prompts used in the tests
    "sliding": dict(
        text=dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                  sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                  num_experts=4, top_k_experts=2, moe_intermediate_size=32),
        canvas_length=16,
    ),
    # two or more global layers, interleaved
    "globals": dict(
        text=dict(vocab_size=320, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=24, global_head_dim=32, num_global_key_value_heads=2,
                  sliding_window=32,
                  layer_types=["full_attention", "sliding_attention", "full_attention", "full_attention"],
                  num_experts=6, top_k_experts=3, moe_intermediate_size=16),
        canvas_length=32,
    ),
    # canvas well below 256, default sliding/global pattern
    "canvas": dict(
        text=dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, global_head_dim=16, num_global_key_value_heads=1,
                  sliding_window=16, num_experts=4, top_k_experts=1, moe_intermediate_size=16),
        canvas_length=24,
    ),
}

EOS_IDS = [1, 5, 6]


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter and layer scalar a non-trivial value, so a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms, router scales, per-expert scales
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.7 + 0.6 * torch.rand(b.shape, generator=g))


def build_reference(kind: str, seed: int = 0, **text_overrides):
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    spec = CONFIGS[kind]
    cfg = DiffusionGemmaConfig(text_config={**spec["text"], **text_overrides}, vision_config=dict(VISION),
                               canvas_length=spec["canvas_length"])
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    randomize(model, seed)
    return model


def save_checkpoint(model, path: Path) -> Path:
    model.save_pretrained(path)
    gen = json.loads((path / "generation_config.json").read_text())
    gen.update(eos_token_id=EOS_IDS, pad_token_id=0, bos_token_id=2)
    (path / "generation_config.json").write_text(json.dumps(gen))
    return path
