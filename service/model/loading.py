"""Load Hugging Face DiffusionGemma checkpoints (as `transformers` saves them) into our network."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from service.errors import CheckpointError
from service.model.config import ModelConfig, read_config
from service.model.fp8_runtime import apply_fp8, fp8_native_reason
from service.model.nvfp4_runtime import apply_nvfp4, nvfp4_native_reason
from service.model.network import DiffusionGemma
from service.model.quantized import dequantize_state, fuse_experts, read_quant_config

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_IGNORED = re.compile(r"^(model\.encoder\.(vision_tower|embed_vision)\.|lm_head\.weight$)")
_DEC = "model.decoder."
_ENC_LAYER = re.compile(r"^model\.encoder\.language_model\.layers\.(\d+)\.(.+)$")
_ENC_EMBED = "model.encoder.language_model.embed_tokens.weight"


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise CheckpointError(f"dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def _safetensor_files(ckpt: Path) -> list[Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"model.safetensors.index.json is malformed: {e}") from None
        files = [ckpt / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise CheckpointError("checkpoint has no *.safetensors weights")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"weight shard {f.name} named by the index is missing")
    return files


def _map_key(key: str) -> str | None:
    """Checkpoint key -> our parameter name; None when the key is ignored (vision, tied copies)."""
    if key.startswith(_DEC):
        name = key[len(_DEC) :]
        name = re.sub(r"^(layers\.\d+\.)layer_scalar$", r"\1decoder_layer_scalar", name)
        name = re.sub(r"^self_conditioning\.(gate_proj|up_proj|down_proj)\.", r"self_conditioning.mlp.\1.", name)
        return name
    m = _ENC_LAYER.match(key)
    if m and m.group(2) == "layer_scalar":
        return f"layers.{m.group(1)}.encoder_layer_scalar"
    return None


def read_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's safetensors files, by checkpoint key. A ModelOpt export
    (hf_quant_config.json) comes back dequantized to float32, its per-expert linears fused as ours."""
    tensors: dict[str, torch.Tensor] = {}
    for f in _safetensor_files(ckpt):
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {f.name}: {e}") from None
    quant = read_quant_config(ckpt)
    if quant is not None:
        log.info("dequantizing a %s checkpoint (%s) to float32 at load", quant.quant_algo, quant.producer)
        tensors = dequantize_state(tensors)
    return fuse_experts(tensors)


def stored_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as stored (FP8 stays FP8), under our names where they map, else their own."""
    return {_map_key(k) or k: t for f in _safetensor_files(ckpt) for k, t in load_file(str(f)).items()}


def load_state(ckpt: Path, model: DiffusionGemma) -> None:
    """Fill `model` from the checkpoint's safetensors files, checking every parameter is present."""
    expected = model.state_dict()
    found: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    unexpected: list[str] = []
    encoder_embed = None
    for key, t in read_tensors(ckpt).items():
        name = _map_key(key)
        if key == _ENC_EMBED:
            encoder_embed = t
        elif name is None:
            (ignored if _IGNORED.match(key) or _ENC_LAYER.match(key) else unexpected).append(key)
        elif name not in expected:
            unexpected.append(key)
        else:
            found[name] = t
    if "embed_tokens.weight" not in found and encoder_embed is not None:
        found["embed_tokens.weight"] = encoder_embed
    if any(k.startswith("model.encoder.vision_tower.") for k in ignored):
        log.info("ignoring the vision tower (%d tensors): text serving only", len(ignored))
    if unexpected:
        raise CheckpointError(f"checkpoint has tensors this architecture does not know: {unexpected[:5]}")
    missing = [k for k in expected if k not in found]
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")
    for name, t in found.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"tensor {name}: shape {tuple(t.shape)} does not match config {tuple(expected[name].shape)}"
            )
    model.load_state_dict(found, strict=True)


def load_model(
    checkpoint_dir: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu"
) -> tuple[ModelConfig, DiffusionGemma]:
    """Read config and weights; returns the config and an eval-mode network on `device`."""
    ckpt = Path(checkpoint_dir)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint directory does not exist: {ckpt}")
    cfg = read_config(ckpt)
    torch_dtype = resolve_dtype(dtype or cfg.dtype)
    with torch.device("meta"):
        model = DiffusionGemma(cfg)
    model = model.to_empty(device="cpu")
    load_state(ckpt, model)
    model = model.to(device=device, dtype=torch_dtype).eval()
    model.reset_buffers()  # RoPE and embed scale are not in the checkpoint; keep them float32
    quant = read_quant_config(ckpt)
    if quant is not None and quant.quant_algo.startswith("FP8") and fp8_native_reason(device) is None:
        # UNVERIFIED (no SM89+ GPU here): FP8 weights stay FP8 on the GPU; everything else is as loaded above.
        swapped = apply_fp8(model, stored_tensors(ckpt))
        log.info("FP8 build on %s: %d modules run FP8 kernels (unverified)", device, swapped)
    elif quant is not None and quant.quant_algo == "NVFP4" and nvfp4_native_reason(device) is None:
        # UNVERIFIED (no Blackwell GPU here): the experts stay NVFP4 (W4A4); the rest is as loaded above.
        swapped = apply_nvfp4(model, stored_tensors(ckpt))
        log.info("NVFP4 build on %s: %d expert modules run FP4 kernels (unverified)", device, swapped)
    return cfg, model
