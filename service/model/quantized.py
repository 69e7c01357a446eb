"""ModelOpt unified checkpoints (`hf_quant_config.json`): read the quantization, dequantize weights on load.

On-disk formats (ModelOpt 0.47 `export_hf_checkpoint`, seen on this project's tiny model):
- FP8: `<m>.weight` float8_e4m3fn [out, in], `<m>.weight_scale` fp32 (scalar per tensor, or [out]/[out, 1] per
  channel), `<m>.input_scale` fp32 scalar (the static activation scale).
- NVFP4: `<m>.weight` uint8 [out, in/2] (two e2m1 codes per byte, the even element in the low nibble),
  `<m>.weight_scale` float8_e4m3fn [out, in/16] (one per block of 16), `<m>.weight_scale_2` fp32 scalar,
  `<m>.input_scale` fp32 scalar.
- Routed experts are written one linear per expert, `<layer>.experts.<e>.{gate,up,down}_proj.*`; our network
  holds them fused as `experts.gate_up_proj` [E, 2I, H] (gate rows first) and `experts.down_proj` [E, H, I].
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from service.errors import CheckpointError
from service.model.config import read_json_object

QUANT_CONFIG = "hf_quant_config.json"
SUPPORTED = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "NVFP4")  # per-channel: weight_scale [out] or [out, 1]
NVFP4_BLOCK = 16
# e2m1 code (sign bit 3, exponent bits 2..1, mantissa bit 0) -> value
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_SUFFIXES = (".weight_scale", ".weight_scale_2", ".input_scale")
EXPERT_KEY = re.compile(r"^(.+\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


@dataclass(frozen=True)
class QuantConfig:
    quant_algo: str  # one of SUPPORTED
    kv_cache_quant_algo: str | None
    group_size: int | None
    exclude_modules: tuple[str, ...]
    producer: str


def read_quant_config(ckpt: str | Path) -> QuantConfig | None:
    """The checkpoint's quantization, or None for plain weights. CheckpointError naming the file when malformed
    or of an algorithm this service cannot load."""
    path = Path(ckpt) / QUANT_CONFIG
    if not path.is_file():
        return None
    raw = read_json_object(path)
    try:
        q = raw["quantization"]
        algo = q["quant_algo"]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{QUANT_CONFIG} is malformed: {e!r}") from None
    if algo not in SUPPORTED:
        raise CheckpointError(f"{QUANT_CONFIG}: quant_algo {algo!r} is not one of {list(SUPPORTED)}")
    producer = raw.get("producer") or {}
    return QuantConfig(algo, q.get("kv_cache_quant_algo"), q.get("group_size"), tuple(q.get("exclude_modules") or ()),
                       f"{producer.get('name', '?')} {producer.get('version', '?')}")


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn [out, in] times a per-tensor scalar or per-channel ([out] or [out, 1]) scale -> float32."""
    if weight.dtype != torch.float8_e4m3fn:
        raise CheckpointError(f"FP8 weight has dtype {weight.dtype}, expected float8_e4m3fn")
    scale = scale.float()
    if scale.numel() == weight.shape[0] and scale.numel() != 1:
        scale = scale.reshape(-1, 1)
    elif scale.numel() != 1:
        raise CheckpointError(f"FP8 weight_scale of shape {tuple(scale.shape)} fits neither per-tensor nor "
                              f"per-channel scaling of a {tuple(weight.shape)} weight")
    return weight.float() * scale


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n/2] holding two e2m1 codes per byte (low nibble first) -> float32 [..., n]."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=packed.device)
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).long()  # [..., n/2, 2]
    return table[codes].flatten(-2)


def dequantize_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, scale_2: torch.Tensor,
                     block: int = NVFP4_BLOCK) -> torch.Tensor:
    """uint8 [out, in/2] e2m1 pairs * float8 block scales [out, in/block] * fp32 global scale -> float32 [out, in]."""
    if packed.dtype != torch.uint8:
        raise CheckpointError(f"NVFP4 weight has dtype {packed.dtype}, expected packed uint8")
    values = unpack_e2m1(packed)
    out, n = values.shape
    if block_scale.shape != (out, n // block):
        raise CheckpointError(f"NVFP4 weight_scale has shape {tuple(block_scale.shape)}, expected {(out, n // block)} "
                              f"for a {(out, n)} weight in blocks of {block}")
    scales = block_scale.float().repeat_interleave(block, dim=1)  # [out, in]
    return values * scales * scale_2.float()


def dequantize_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace every quantized `<m>.weight` and its scales with a float32 `<m>.weight`. Unquantized tensors pass."""
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key.endswith(SCALE_SUFFIXES):
            continue
        base = key[: -len(".weight")] if key.endswith(".weight") else None
        scale = tensors.get(f"{base}.weight_scale") if base else None
        if scale is None:
            if t.dtype in (torch.float8_e4m3fn, torch.uint8):
                raise CheckpointError(f"tensor {key} is quantized ({t.dtype}) but has no weight_scale")
            out[key] = t
        elif t.dtype == torch.float8_e4m3fn:
            out[key] = dequantize_fp8(t, scale)
        elif t.dtype == torch.uint8:
            scale_2 = tensors.get(f"{base}.weight_scale_2")
            if scale_2 is None:
                raise CheckpointError(f"NVFP4 tensor {key} has no weight_scale_2")
            out[key] = dequantize_nvfp4(t, scale, scale_2)
        else:
            raise CheckpointError(f"tensor {key} has a weight_scale but dtype {t.dtype}")
    return out


def fuse_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert linears `<p>.experts.<e>.{gate,up,down}_proj.weight` -> `<p>.experts.gate_up_proj` [E, 2I, H]
    and `<p>.experts.down_proj` [E, H, I]. Checkpoints already fused pass unchanged."""
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = EXPERT_KEY.match(key)
        if m:
            groups.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
        else:
            out[key] = t
    for prefix, experts in groups.items():
        ids = sorted(experts)
        if ids != list(range(len(ids))) or any(len(experts[e]) != 3 for e in ids):
            raise CheckpointError(f"{prefix}: experts {ids} are incomplete (each needs gate_proj, up_proj, down_proj)")
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat((experts[e]["gate_proj"], experts[e]["up_proj"]), dim=0) for e in ids])
        out[f"{prefix}.down_proj"] = torch.stack([experts[e]["down_proj"] for e in ids])
    return out
