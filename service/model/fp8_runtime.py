"""FP8 weights kept in FP8 on a GPU: dense linears on torch._scaled_mm, routed experts on F.scaled_grouped_mm.

UNVERIFIED: no machine of this project has a Hopper (SM90) or Blackwell (SM100) GPU. What the CPU can check is checked by the tests:
the scale handling of `FP8Linear` (torch._scaled_mm also runs on a CPU) and of `FP8Experts` through its
per-expert loop, both against the dequantized weights. The CUDA branch of `FP8Experts` (F.scaled_grouped_mm,
rowwise scales) has never run. Activations are quantized to float8_e4m3fn per tensor with the export's static
`input_scale` for dense linears, and per row (dynamic) for the experts.

NVFP4 experts have their own runtime (service.model.nvfp4_runtime, Blackwell only, also unverified).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.errors import Unavailable
from service.model.kernels import fp8_refusal
from service.model.layers import Experts
from service.model.native import native_reason

FP8_MAX = 448.0
MIN_CAPABILITY = (9, 0)


def fp8_native_reason(device: torch.device | str) -> str | None:
    """None when FP8 weights can run natively on `device`, else why not (the build is then dequantized, or on a
    GPU without the kernels refused: see `fp8_gpu_refusal`)."""
    missing = [n for n, ok in (("_scaled_mm", hasattr(torch, "_scaled_mm")),
                               ("scaled_grouped_mm", hasattr(F, "scaled_grouped_mm"))) if not ok]
    return native_reason(device, "FP8", MIN_CAPABILITY, "Hopper, Blackwell SM100", missing) or \
        fp8_gpu_refusal(device)


def fp8_gpu_refusal(device: torch.device | str) -> str | None:
    """On a CUDA device outside SM90/SM100: why an FP8 engine is refused there, and what it gets instead."""
    dev = torch.device(device)
    return fp8_refusal(tuple(torch.cuda.get_device_capability(dev))) if dev.type == "cuda" else None


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] -> float8_e4m3fn [M, K] and its per-row fp32 scales [M, 1] (dynamic, amax / 448)."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


class FP8Linear(nn.Module):
    """y = x @ W^T with W float8_e4m3fn [out, in] and its fp32 scale (per tensor, or per output channel)."""

    def __init__(self, weight: Tensor, weight_scale: Tensor, input_scale: Tensor | None) -> None:
        super().__init__()
        if weight.dtype != torch.float8_e4m3fn:
            raise ValueError(f"FP8Linear needs a float8_e4m3fn weight, got {weight.dtype}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale.float().reshape(-1))
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().reshape(()))

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.input_scale is not None and self.weight_scale.numel() == 1:
            xq = (x2.float() / self.input_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=self.input_scale, scale_b=self.weight_scale,
                                 out_dtype=x.dtype)
        else:  # rowwise: per-row activation scales with per-channel (or broadcast) weight scales
            xq, sa = quantize_rows(x2)
            sb = self.weight_scale.expand(self.out_features).reshape(1, -1).contiguous()
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=sa, scale_b=sb, out_dtype=x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


class FP8Experts(Experts):
    """Experts whose `gate_up` [E, 2I, H] and `down` [E, H, I] weights stay float8 with per-row scales [E, out]."""

    def load_fp8(self, gate_up: Tensor, gate_up_scale: Tensor, down: Tensor, down_scale: Tensor) -> None:
        del self.gate_up_proj, self.down_proj  # the dequantized copies: FP8 is what the GPU reads
        for name, t in (("gate_up_fp8", gate_up), ("gate_up_scale", gate_up_scale.float()), ("down_fp8", down),
                        ("down_scale", down_scale.float())):
            self.register_buffer(name, t)

    def project(self, x: Tensor, which: str, offsets: Tensor) -> Tensor:
        w, sb = (self.gate_up_fp8, self.gate_up_scale) if which == "gate_up_proj" else (self.down_fp8, self.down_scale)
        xq, sa = quantize_rows(x)
        if x.device.type == "cuda":  # UNVERIFIED: no SM90/SM100 GPU here
            return F.scaled_grouped_mm(xq, w.transpose(-2, -1), sa.reshape(-1), F.ScalingType.RowWise, sb,
                                       F.ScalingType.RowWise, offs=offsets, output_dtype=x.dtype)
        parts, start = [], 0  # one _scaled_mm per expert: the CPU check of the scales, and any other device
        for e, end in enumerate(offsets.tolist()):
            if end > start:
                parts.append(torch._scaled_mm(xq[start:end], w[e].t(), scale_a=sa[start:end],
                                              scale_b=sb[e].reshape(1, -1).contiguous(), out_dtype=x.dtype))
            start = end
        return torch.cat(parts) if parts else x.new_zeros(0, w.shape[1])

    def min_shared_rows(self) -> int | None:
        return None  # batch-invariance sharing is a CPU float feature


def _expert_weights(raw: dict[str, Tensor], prefix: str, names: tuple[str, ...]) -> tuple[Tensor, Tensor]:
    """Per-expert FP8 weights (each [out_e, in], scalar or per-channel scale), popped from `raw` as they are
    copied, -> [E, sum out, in] and per-row scales [E, sum out]: one expert's copy in flight, not a layer's."""
    count = 0
    while f"{prefix}.{count}.{names[0]}.weight" in raw:
        count += 1
    first = [raw[f"{prefix}.0.{n}.weight"] for n in names]
    rows, dev = sum(w.shape[0] for w in first), first[0].device
    weight = torch.empty(count, rows, first[0].shape[1], dtype=torch.uint8, device=dev)  # as bytes: not every
    scales = torch.empty(count, rows, dtype=torch.float32, device=dev)  # device copies float8
    for e in range(count):
        row = 0
        for n in names:
            w, s = raw.pop(f"{prefix}.{e}.{n}.weight"), raw.pop(f"{prefix}.{e}.{n}.weight_scale").float().reshape(-1)
            raw.pop(f"{prefix}.{e}.{n}.input_scale", None)
            weight[e, row:row + w.shape[0]] = w.view(torch.uint8)
            scales[e, row:row + w.shape[0]] = s.to(dev).expand(w.shape[0])
            row += w.shape[0]
    return weight.view(torch.float8_e4m3fn), scales


def apply_fp8(model: nn.Module, raw: dict[str, Tensor], device: torch.device | str | None = None) -> int:
    """Swap the model's linears and experts whose weights `raw` (our module names) holds in FP8 for their FP8
    versions, on `device` (None: each module's own). Consumes `raw`'s FP8 entries. Returns how many modules were
    swapped."""
    swapped = 0
    for name, module in list(model.named_modules()):
        where = device or next(module.parameters(), torch.empty(0)).device
        if isinstance(module, nn.Linear) and raw.get(f"{name}.weight", torch.empty(0)).dtype == torch.float8_e4m3fn:
            fp8 = FP8Linear(raw.pop(f"{name}.weight"), raw.pop(f"{name}.weight_scale"),
                            raw.pop(f"{name}.input_scale", None))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, fp8.to(where))
            swapped += 1
        elif type(module) is Experts and raw.get(f"{name}.0.gate_proj.weight", torch.empty(0)).dtype == \
                torch.float8_e4m3fn:
            gate_up, gu_scale = _expert_weights(raw, name, ("gate_proj", "up_proj"))
            down, down_scale = _expert_weights(raw, name, ("down_proj",))
            module.__class__ = FP8Experts
            module.load_fp8(*(t.to(where) for t in (gate_up, gu_scale, down, down_scale)))
            swapped += 1
    if not swapped:
        raise Unavailable("the FP8 build has no FP8 linear this runtime recognises")
    return swapped
