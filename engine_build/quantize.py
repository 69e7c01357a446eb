"""Quantization with NVIDIA ModelOpt and the export of its unified Hugging Face checkpoint.

FP8 (W8A8, per-tensor or per-channel weights, per-tensor activations) covers every linear layer: attention,
dense MLP, routed experts and the self-conditioning MLP; ModelOpt's default exclusions keep the router, the
embeddings, the unembedding (lm_head) and the vision tower unquantized. NVFP4 is ModelOpt's own DiffusionGemma
recipe (`huggingface/diffusion_gemma/ptq/nvfp4_experts_only`): NVFP4 on the routed experts only, FP8 KV cache,
self-conditioning excluded. Both calibrate on a CPU; NVFP4's fake-quant forward needs CUDA (never run here).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from engine_build.reference import has_vision, is_vision_key

FP8_SCALINGS = ("per-tensor", "per-channel")
NVFP4_RECIPE = "huggingface/diffusion_gemma/ptq/nvfp4_experts_only"
# Files of the source checkpoint that the export replaces (weights and config) and so are not copied.
_EXPORTED = ("config.json", "hf_quant_config.json", "model.safetensors.index.json")


def quant_config(precision: str, fp8_scaling: str = "per-tensor") -> Any:
    """The ModelOpt quantization config of a precision ("fp8" or "nvfp4")."""
    import modelopt.torch.quantization as mtq

    if precision == "nvfp4":
        from modelopt.recipe import load_recipe

        return load_recipe(NVFP4_RECIPE).quantize
    if precision != "fp8":
        raise ValueError(f"no quantization for precision {precision!r}")
    if fp8_scaling not in FP8_SCALINGS:
        raise ValueError(f"fp8 scaling {fp8_scaling!r} is not one of {FP8_SCALINGS}")
    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    if fp8_scaling == "per-channel":  # one scale per output row of each weight; activations stay per-tensor
        for entry in cfg["quant_cfg"]:
            if entry.get("quantizer_name") == "*weight_quantizer" and "cfg" in entry:
                entry["cfg"] = {**entry["cfg"], "axis": 0}
    return cfg


def quantize(model: torch.nn.Module, precision: str, loop: Callable[[torch.nn.Module], None],
             fp8_scaling: str = "per-tensor") -> torch.nn.Module:
    """Insert ModelOpt's quantizers and calibrate them (max calibration) by running `loop(model)`."""
    import modelopt.torch.quantization as mtq

    return mtq.quantize(model, quant_config(precision, fp8_scaling), loop)


def export(model: torch.nn.Module, source: Path, out: Path) -> None:
    """ModelOpt's unified HF export into `out`, then: the source's config.json (with `architectures` and the
    export's `quantization_config`), the source's other files (tokenizer, generation config, ...), and no
    placeholder vision tensors when the source had none."""
    from modelopt.torch.export import export_hf_checkpoint

    export_hf_checkpoint(model, export_dir=str(out))
    exported = json.loads((out / "config.json").read_text())
    cfg = json.loads((source / "config.json").read_text())
    cfg["architectures"] = exported.get("architectures") or cfg.get("architectures")
    if "quantization_config" in exported:
        cfg["quantization_config"] = exported["quantization_config"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if not has_vision(source):
        _strip_vision(out)
    copy_aux_files(source, out)


def copy_aux_files(source: Path, out: Path) -> None:
    """Every regular file of the source except weights and what the export wrote itself."""
    for f in sorted(source.iterdir()):
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in _EXPORTED:
            shutil.copy2(f, out / f.name)


def _strip_vision(out: Path) -> None:
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    for f in sorted(out.glob("*.safetensors")):
        tensors = load_file(str(f))
        kept = {k: t for k, t in tensors.items() if not is_vision_key(k)}
        if len(kept) != len(tensors):
            save_file(kept, str(f), metadata={"format": "pt"})
    if index is not None:
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not is_vision_key(k)}
        index_path.write_text(json.dumps(index, indent=2) + "\n")


def cast_checkpoint(source: Path, out: Path, dtype: torch.dtype) -> None:
    """A plain copy of the checkpoint with its floating-point weights in `dtype` (fp32/bf16 profiles)."""
    for f in sorted(source.glob("*.safetensors")):
        tensors = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in load_file(str(f)).items()}
        save_file(tensors, str(out / f.name), metadata={"format": "pt"})
    index = source / "model.safetensors.index.json"
    if index.is_file():
        shutil.copy2(index, out / index.name)
    cfg = json.loads((source / "config.json").read_text())
    name = str(dtype).removeprefix("torch.")
    cfg["dtype"] = name
    if isinstance(cfg.get("text_config"), dict):
        cfg["text_config"]["dtype"] = name
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    copy_aux_files(source, out)
