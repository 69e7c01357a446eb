"""NVFP4 routed experts kept in FP4 on a GPU: W4A4 on torch's block-scaled `F.scaled_mm` (Blackwell, SM100+).

UNVERIFIED: no machine of this project has a Blackwell GPU, so the CUDA call in `nvfp4_mm` has never run. The CPU
checks everything around it (tests/unit/model/test_nvfp4_runtime.py): the activation quantization (e2m1 codes
rounded to nearest-even, e4m3 block scales of 16 under the calibrated global scale), the packing (the byte layout
of ModelOpt's export and of torch.float4_e2m1fn_x2: even element in the low nibble), the swizzled scale layout
(cuBLAS's 128x4 tiles, against its index formula), and the whole module through `nvfp4_mm`'s emulation (the same
operands decoded and multiplied in float32) against the weights dequantized at load.

Per expert, one `F.scaled_mm` over that expert's rows: torch has no grouped block-scaled FP4 GEMM to call, and
the loop reads the group sizes on the host, so a decoder pass with NVFP4 experts is not CUDA-graph captured
(service.engine.cuda_graphs runs it eagerly).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.errors import Unavailable
from service.model.layers import Experts
from service.model.native import native_reason
from service.model.quantized import NVFP4_BLOCK, dequantize_nvfp4

FP4_MAX = 6.0
E4M3_MAX = 448.0
MIN_CAPABILITY = (10, 0)
log = logging.getLogger("dgemma.model")
# Logged once when NVFP4 experts load for native execution: what the step pays for the missing grouped kernel.
PER_EXPERT_LINE = ("NVFP4 experts run one F.scaled_mm per expert with rows, not one grouped GEMM: torch %s's "
                   "F.scaled_grouped_mm is not verified here for NVFP4's 1x16 e4m3 block scales. The group sizes are "
                   "read on the host, so decoder passes are not CUDA-graph captured (UNVERIFIED: no Blackwell GPU "
                   "has run this)")
# midpoints between the e2m1 magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def nvfp4_native_reason(device: torch.device | str) -> str | None:
    """None when NVFP4 experts can run natively on `device`, else why not (the build is then dequantized)."""
    missing = [n for n, ok in (("float4_e2m1fn_x2", hasattr(torch, "float4_e2m1fn_x2")),
                               ("F.scaled_mm", hasattr(F, "scaled_mm"))) if not ok]
    return native_reason(device, "NVFP4", MIN_CAPABILITY, "Blackwell", missing)


def encode_e2m1(v: Tensor) -> Tensor:
    """float values already in e2m1 range -> uint8 codes (sign bit 3), rounded to nearest, ties to even."""
    mids = torch.tensor(_MIDPOINTS, dtype=torch.float32, device=v.device)
    mag = v.abs().float().clamp(max=FP4_MAX)
    idx = torch.bucketize(mag, mids)  # a tie goes to the lower magnitude here
    tie = (idx < len(_MIDPOINTS)) & (mag == mids[idx.clamp(max=len(_MIDPOINTS) - 1)])
    idx = torch.where(tie & (idx % 2 == 1), idx + 1, idx)  # ...and to the even code (mantissa bit 0) instead
    return (idx + 8 * (v < 0).long()).to(torch.uint8)


def pack_e2m1(codes: Tensor) -> Tensor:
    """uint8 codes [..., n] -> [..., n/2], two per byte, the even element in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def quantize_nvfp4(x: Tensor, global_scale: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] -> packed e2m1 [M, K/2] and float8_e4m3fn block scales [M, K/16], under `global_scale` (fp32
    scalar: the calibrated decode scale, amax / (6 * 448)). x ~= e2m1 * block_scale * global_scale."""
    m, k = x.shape
    blocks = x.float().reshape(m, k // NVFP4_BLOCK, NVFP4_BLOCK)  # [M, K/16, 16]
    g = global_scale.float().reshape(())
    amax = blocks.abs().amax(dim=-1)  # [M, K/16]
    scale = (amax / FP4_MAX / g).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    decode = (scale.float() * g).unsqueeze(-1)  # [M, K/16, 1]
    values = torch.where(decode > 0, blocks / decode.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
    return pack_e2m1(encode_e2m1(values).reshape(m, k)), scale


def to_blocked(scales: Tensor) -> Tensor:
    """Block scales [R, C] -> cuBLAS's swizzled layout (flat): padded to 128-row x 4-column tiles, each tile
    stored as [32, 4, 4] (row % 32, row // 32 within the tile, column)."""
    r, c = scales.shape
    rows, cols = -(-r // 128) * 128, -(-c // 4) * 4
    padded = torch.zeros(rows, cols, dtype=torch.uint8, device=scales.device)
    padded[:r, :c] = scales.view(torch.uint8)
    tiles = padded.view(rows // 128, 128, cols // 4, 4).permute(0, 2, 1, 3)  # [R/128, C/4, 128, 4]
    return tiles.reshape(-1, 4, 32, 4).transpose(1, 2).reshape(-1).view(scales.dtype)


def nvfp4_mm(xq: Tensor, xs: Tensor, xg: Tensor, wq: Tensor, ws: Tensor, wg: Tensor, out_dtype: torch.dtype,
             emulate: bool, ws_blocked: Tensor | None = None) -> Tensor:
    """x @ w^T for NVFP4 x [M, K/2] (scales xs [M, K/16], global xg) and w [N, K/2] (ws [N, K/16], wg) -> [M, N].
    `emulate`: decode both (service.model.quantized.dequantize_nvfp4, the loader's own decoding) and multiply in
    float32, the CPU's check of the operands, instead of the kernel. `ws_blocked`: to_blocked(ws), made once."""
    if emulate:
        return (dequantize_nvfp4(xq, xs, xg) @ dequantize_nvfp4(wq, ws, wg).t()).to(out_dtype)
    recipe = [F.ScalingType.BlockWise1x16, F.ScalingType.TensorWise]  # UNVERIFIED: never run on Blackwell
    swizzle = [F.SwizzleType.SWIZZLE_32_4_4, F.SwizzleType.NO_SWIZZLE]
    fp4 = torch.float4_e2m1fn_x2
    wsb = to_blocked(ws) if ws_blocked is None else ws_blocked
    return F.scaled_mm(xq.view(fp4), wq.view(fp4).t(), scale_a=[to_blocked(xs), xg.float().reshape(1)],
                       scale_recipe_a=recipe, scale_b=[wsb, wg.float().reshape(1)], scale_recipe_b=recipe,
                       swizzle_a=swizzle, swizzle_b=swizzle, output_dtype=out_dtype)


class NVFP4Experts(Experts):
    """Experts whose fused `gate_up` [E, 2I, H/2] and `down` [E, H, I/2] stay packed e2m1 with e4m3 block scales, a
    global weight scale [E] and the calibrated global input scale [E] per expert (gate and up share both)."""

    emulate = False  # True: nvfp4_mm decodes in float32 (any device; the CPU's check)

    def load_nvfp4(self, tensors: dict[str, Tensor]) -> None:
        del self.gate_up_proj, self.down_proj  # the dequantized copies: FP4 is what the GPU reads
        for name, t in tensors.items():
            self.register_buffer(name, t)
        for p in ("gate_up", "down"):  # the weights' scales in the kernel's layout, once, not every step
            scales = getattr(self, f"{p}_scale")
            self.register_buffer(f"{p}_scale_blocked", torch.stack([to_blocked(s) for s in scales]))

    def project(self, x: Tensor, which: str, offsets: Tensor) -> Tensor:
        p = "gate_up" if which == "gate_up_proj" else "down"
        w, ws, wsb, wg, xg = (getattr(self, f"{p}_{s}") for s in ("weight", "scale", "scale_blocked", "scale_2",
                                                                   "input_scale"))
        parts, start = [], 0
        for e, end in enumerate(offsets.tolist()):  # host sync: see the module's docstring
            if end > start:
                xq, xs = quantize_nvfp4(x[start:end], xg[e])
                parts.append(nvfp4_mm(xq, xs, xg[e], w[e], ws[e], wg[e], x.dtype, self.emulate, wsb[e]))
            start = end
        return torch.cat(parts) if parts else x.new_zeros(0, w.shape[1])

    def min_shared_rows(self) -> int | None:
        return None  # batch-invariance sharing is a CPU float feature


def _expert_tensors(raw: dict[str, Tensor], prefix: str, names: tuple[str, ...], key: str) -> dict[str, Tensor]:
    """Per-expert NVFP4 linears -> stacked [E, sum out, in/2] weights, [E, sum out, in/16] scales and [E] global
    weight and input scales (the linears of one projection must share them, as ModelOpt exports gate and up)."""
    weights, scales, scale_2, input_scale, e = [], [], [], [], 0
    while f"{prefix}.{e}.{names[0]}.weight" in raw:
        linears = [{s: raw.pop(f"{prefix}.{e}.{n}.{s}") for s in ("weight", "weight_scale", "weight_scale_2",
                                                               "input_scale")} for n in names]
        for s in ("weight_scale_2", "input_scale"):
            if any(not torch.equal(lin[s].float(), linears[0][s].float()) for lin in linears[1:]):
                raise Unavailable(f"{prefix}.{e}: {'/'.join(names)} have different {s}; cannot fuse them in NVFP4")
        weights.append(torch.cat([lin["weight"] for lin in linears]))
        scales.append(torch.cat([lin["weight_scale"].view(torch.uint8) for lin in linears]))
        scale_2.append(linears[0]["weight_scale_2"].float().reshape(()))
        input_scale.append(linears[0]["input_scale"].float().reshape(()))
        e += 1
    return {f"{key}_weight": torch.stack(weights), f"{key}_scale": torch.stack(scales).view(torch.float8_e4m3fn),
            f"{key}_scale_2": torch.stack(scale_2), f"{key}_input_scale": torch.stack(input_scale)}


def apply_nvfp4(model: nn.Module, raw: dict[str, Tensor], emulate: bool = False,
                device: torch.device | str | None = None) -> int:
    """Swap the model's experts whose weights `raw` (our module names) holds in NVFP4 for NVFP4Experts, on `device`
    (None: the module's own). Consumes `raw`'s NVFP4 entries. Returns how many were swapped."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if type(module) is Experts and raw.get(f"{name}.0.gate_proj.weight", torch.empty(0)).dtype == torch.uint8:
            where = device or next(module.parameters()).device
            tensors = _expert_tensors(raw, name, ("gate_proj", "up_proj"), "gate_up")
            tensors.update(_expert_tensors(raw, name, ("down_proj",), "down"))
            module.__class__ = NVFP4Experts
            module.load_nvfp4({k: t.to(where) for k, t in tensors.items()})
            module.emulate = emulate
            swapped += 1
    if not swapped:
        raise Unavailable("the NVFP4 build has no NVFP4 experts this runtime recognises")
    if not emulate:
        log.warning(PER_EXPERT_LINE, torch.__version__)
    return swapped

