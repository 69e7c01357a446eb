"""What the front knows of the model it serves: its config, tokenizer and defaults (read from the checkpoint,
no weights loaded)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from service.model.config import ModelConfig, read_config, read_generation_config, special_ids
from service.text.tokenizer import Tokenizer, load_tokenizer
from service.sampler.params import GenerationParams, params_from_generation_config


@dataclass(frozen=True)
class ServedModel:
    id: str
    profile: str  # e.g. torch-fp32-cpu, "torch-fp8-hopper (dequantized on cpu)"
    config: ModelConfig
    tokenizer: Tokenizer | None
    defaults: GenerationParams
    eos_id: int
    pad_id: int

    @staticmethod
    def load(checkpoint_dir: Path, model_id: str, profile: str) -> "ServedModel":
        cfg = read_config(checkpoint_dir)
        gen = read_generation_config(checkpoint_dir)
        eos_ids, pad_id = special_ids(cfg, gen)
        return ServedModel(
            id=model_id, profile=profile, config=cfg, tokenizer=load_tokenizer(checkpoint_dir),
            # the token that closes an Edit/Template canvas: the first EOS id, else the text config's
            defaults=params_from_generation_config(gen), eos_id=int((eos_ids or cfg.eos_token_ids)[0]), pad_id=pad_id,
        )
