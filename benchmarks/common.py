"""Shared set-up for the CPU benchmarks: the "small" random DiffusionGemma, saved by transformers."""

from __future__ import annotations

import platform
import tempfile
import time
from pathlib import Path

import torch

SMALL_TEXT = dict(
    vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, global_head_dim=64, num_global_key_value_heads=1, sliding_window=1024,
    layer_types=["sliding_attention"] * 5 + ["full_attention"], num_experts=8, top_k_experts=2,
    moe_intermediate_size=256,
)
VISION = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=2, head_dim=8)
CANVAS, PROMPT, STEPS = 256, 64, 16
NO_EARLY_STOP = 1e-12  # the reference refuses 0; nothing reaches this mean entropy


def small_checkpoint(seed: int = 0) -> tuple[object, Path]:
    """The reference model (random weights) and the directory it was saved to."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    cfg = DiffusionGemmaConfig(text_config=dict(SMALL_TEXT), vision_config=dict(VISION), canvas_length=CANVAS)
    torch.manual_seed(seed)
    ref = DiffusionGemmaForBlockDiffusion(cfg).eval()
    path = Path(tempfile.mkdtemp(prefix="dgemma-bench-"))
    ref.save_pretrained(path)
    return ref, path


def best_time(fn, repeats: int) -> float:
    """The shortest of `repeats` wall-clock runs of fn(), in seconds."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def machine() -> dict:
    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
