"""The model ModelOpt quantizes: transformers' reference DiffusionGemma, loaded from the source checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from service.errors import CheckpointError
from service.model.config import ARCHITECTURE, ModelConfig, read_config

_VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
# A placeholder vision tower for text-only checkpoints: transformers always builds one (16 layers by default),
# ModelOpt leaves it unquantized, and its tensors are dropped from the export (see quantize._strip_vision).
_TINY_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=8)


def check_source(ckpt: str | Path) -> ModelConfig:
    """The source checkpoint's config, or CheckpointError naming --checkpoint (missing, other architecture)."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"--checkpoint: {ckpt} is not a directory")
    try:
        return read_config(ckpt)
    except CheckpointError as e:
        raise CheckpointError(f"--checkpoint {ckpt.name}: {e.message}") from None


def weight_keys(ckpt: Path) -> list[str]:
    keys: list[str] = []
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            keys.extend(st.keys())
    return keys


def has_vision(ckpt: Path) -> bool:
    return any(k.startswith(_VISION_PREFIXES) for k in weight_keys(ckpt))


def is_vision_key(key: str) -> bool:
    return key.startswith(_VISION_PREFIXES)


def load_reference(ckpt: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.nn.Module:
    """transformers' DiffusionGemmaForBlockDiffusion with the checkpoint's weights in `dtype`, in eval mode, on
    `device`: read on the CPU, then moved (a `device_map` would need accelerate). "cuda" is UNVERIFIED.

    Two in-memory adjustments, undone by the export (quantize.export writes the source's own config.json): a null
    `image_token_id` becomes -1 (the reference's generate compares prompt ids with it), and a text-only
    checkpoint gets a one-layer placeholder vision tower instead of a random 16-layer one.
    """
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

    ckpt = Path(ckpt)
    cfg = DiffusionGemmaConfig.from_pretrained(ckpt)
    if cfg.image_token_id is None:
        cfg.image_token_id = -1
    if not has_vision(ckpt):
        for k, v in _TINY_VISION.items():
            setattr(cfg.vision_config, k, v)
    cfg.architectures = [ARCHITECTURE]  # ModelOpt's export needs it
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists the placeholder vision tower as "MISSING"
    try:
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(
            ckpt, config=cfg, dtype=dtype, generation_config=DiffusionGemmaGenerationConfig())
    finally:
        hf_logging.set_verbosity(level)
    return model.to(device).eval()


def generation_ids(ckpt: Path) -> tuple[list[int], int, int]:
    """(eos ids, pad id, bos id) from generation_config.json, with the engine's defaults."""
    path = ckpt / "generation_config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {}
    eos = gen.get("eos_token_id", 1)
    return (eos if isinstance(eos, list) else [eos]), int(gen.get("pad_token_id", 0)), int(gen.get("bos_token_id", 2))
