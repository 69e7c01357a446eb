"""Hand-written ModelOpt-format checkpoints (the documented tensors, no ModelOpt), for loader tests.

Quantizes every linear of a float checkpoint except routers, norms and embeddings (FP8: per tensor or per channel;
NVFP4: the routed experts only, as ModelOpt's DiffusionGemma recipe), splitting the fused experts into per-expert
linears as ModelOpt's export writes them.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from service.model.quantized import E2M1_VALUES

FP8_MAX, E2M1_MAX = 448.0, 6.0
_LINEAR = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")


def fp8(w: torch.Tensor, per_channel: bool = False) -> dict[str, torch.Tensor]:
    amax = w.abs().amax(dim=1) if per_channel else w.abs().max()
    scale = (amax / FP8_MAX).clamp(min=1e-12).float()
    q = (w / (scale.reshape(-1, 1) if per_channel else scale)).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale": scale, "input_scale": torch.tensor(0.01)}


def nvfp4(w: torch.Tensor, amax: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """`amax`: the global amax when several linears share one global scale (ModelOpt's gate and up do)."""
    out, n = w.shape
    scale_2 = ((w.abs().max() if amax is None else amax) / (E2M1_MAX * FP8_MAX)).float()
    blocks = w.reshape(out, n // 16, 16)
    block_scale = (blocks.abs().amax(-1) / E2M1_MAX / scale_2).to(torch.float8_e4m3fn)  # [out, n/16]
    scaled = blocks / (block_scale.float().unsqueeze(-1) * scale_2).clamp(min=1e-12)
    table = torch.tensor(E2M1_VALUES[:8])
    mag = (scaled.abs().unsqueeze(-1) - table).abs().argmin(-1)  # nearest magnitude code
    codes = (mag | ((scaled < 0).long() << 3)).reshape(out, n).to(torch.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return {"weight": packed, "weight_scale": block_scale, "weight_scale_2": scale_2,
            "input_scale": torch.tensor(0.01)}


def decoder_logits(models: list, cfg) -> list[torch.Tensor]:
    """Each model's logits for one seeded prompt and canvas: the same encoder and decoder pass for all."""
    prompt = torch.randint(3, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    canvas = torch.randint(3, cfg.vocab_size, (1, cfg.canvas_length), generator=torch.Generator().manual_seed(1))
    out = []
    with torch.no_grad():
        for m in models:
            cache = [m.new_cache(12 + cfg.canvas_length)]
            m.encode(prompt, [12], cache)
            out.append(m.logits(m.decode(canvas, None, cache)))
    return out


def write_quantized(src: Path, dst: Path, algo: str, per_channel: bool = False) -> Path:
    """Copy the checkpoint `src` to `dst` with its weights quantized as ModelOpt's export stores them."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(str(next(src.glob("*.safetensors"))))
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            prefix, kind = key.rsplit(".", 1)
            for e in range(t.shape[0]):
                parts = dict(zip(("gate_proj", "up_proj"), t[e].chunk(2))) if kind == "gate_up_proj" else {
                    "down_proj": t[e]}
                for name, w in parts.items():
                    q = nvfp4(w, t[e].abs().max()) if algo == "NVFP4" else fp8(w, per_channel)
                    out.update({f"{prefix}.{e}.{name}.{k}": v.contiguous() for k, v in q.items()})
        elif algo == "FP8" and _LINEAR.search(key) and ".vision" not in key:
            base = key[: -len(".weight")]
            out.update({f"{base}.{k}": v for k, v in fp8(t, per_channel).items()})
        else:
            out[key] = t
    save_file(out, str(dst / "model.safetensors"))
    label = "FP8_PER_CHANNEL_PER_TOKEN" if algo == "FP8" and per_channel else algo  # as ModelOpt labels it
    quant = {"quant_algo": label, "kv_cache_quant_algo": None, "exclude_modules": ["lm_head", "*router*"]}
    if algo == "NVFP4":
        quant["group_size"] = 16
    (dst / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "tests", "version": "0"},
                                                         "quantization": quant}))
    return dst
