"""Peak host memory of loading a checkpoint, as a ratio to the checkpoint's bytes (issue 24's goal: <= 1.2).

`python benchmarks/load_memory.py [--layers 2] [--tiny] [--dir DIR]` prints one JSON line.

It writes a synthetic checkpoint with the real DiffusionGemma layer widths (hidden 2816, 16 heads, 128 experts of
704, dense MLP 2112, the full 262,144-entry vocabulary: a 1.4 GiB embedding in bf16), `--layers` layers (one
sliding, one global: head dim 512, no v_proj), in bf16; and an FP8 build of it in ModelOpt's unified format
(float8_e4m3fn weights, fp32 `weight_scale` and `input_scale`, experts one linear per expert; routers, embeddings
and self-conditioning left bf16). The FP8 build is written tensor by tensor here, not by `dgemma build`: the
build stage calibrates a float32 copy (about 9 GB at this shape), too much for the machine this ran on.

Each load runs in a fresh subprocess, on the CPU, in bf16: peak RSS (ru_maxrss) minus the RSS after imports.
- `bf16`: the bf16 checkpoint.
- `fp8_packed`: the FP8 build with its packed weights kept (`keep_quantized=True`): the loading path a GPU
  takes, run on the CPU (on a GPU the packed tensors go to device memory; host memory is one tensor in flight).
- `fp8_dequantized`: the FP8 build as a CPU serves it, dequantized to bf16 tensor by tensor. Its result is about
  twice the FP8 checkpoint (FP8 experts become bf16), so its ratio is also given to the loaded network's bytes.
Files are written with plain reads and writes, and loading reads without mmap: no page of the file counts in RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine  # noqa: E402
from service.model.config import parse_config  # noqa: E402
from service.model.loading import checkpoint_key  # noqa: E402
from service.model.network import DiffusionGemma  # noqa: E402

FP8_MAX = 448.0
_ST = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3"}
_FP8_LINEARS = (".q_proj.weight", ".k_proj.weight", ".v_proj.weight", ".o_proj.weight", ".mlp.gate_proj.weight",
                ".mlp.up_proj.weight", ".mlp.down_proj.weight")
Entry = tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]  # key, dtype, shape, maker


def hf_config(layers: int, tiny: bool) -> dict:
    """config.json: the real widths (or tiny ones for the smoke test); layer 1 is global."""
    width = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, num_experts=8, top_k_experts=2, moe_intermediate_size=32) if tiny else dict(
        vocab_size=262_144, hidden_size=2816, intermediate_size=2112, num_attention_heads=16, num_key_value_heads=8,
        head_dim=256, num_experts=128, top_k_experts=8, moe_intermediate_size=704)
    types = ["full_attention" if i % 6 == 1 else "sliding_attention" for i in range(layers)]
    glob = {"head_dim": 2 * width["head_dim"], "num_key_value_heads": max(1, width["num_key_value_heads"] // 4)}
    text = dict(width, num_hidden_layers=layers, sliding_window=1024, layer_types=types,
                per_layer_config={str(i): glob for i, t in enumerate(types) if t == "full_attention"},
                hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, final_logit_softcapping=30.0,
                dtype="bfloat16", model_type="diffusion_gemma_text",
                rope_parameters={"full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1e6,
                                                    "rope_type": "proportional"},
                                 "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}})
    return {"architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
            "canvas_length": 256, "tie_word_embeddings": True, "dtype": "bfloat16", "text_config": text}


def _random(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """bf16 N(0, 0.02) (vectors: ones), made in row chunks so the writer stays small."""
    if len(shape) <= 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16)  # [rows, ...]
    g = torch.Generator().manual_seed(seed)
    flat = out.view(shape[0], -1)
    step = max(1, (16 << 20) // flat.shape[1])
    for i in range(0, shape[0], step):
        flat[i:i + step] = torch.randn(flat[i:i + step].shape, generator=g).mul_(0.02)
    return out


def _fp8(shape: tuple[int, ...], seed: int) -> dict[str, torch.Tensor]:
    w = _random(shape, seed).float()  # [out, in]
    scale = (w.abs().max() / FP8_MAX).clamp(min=1e-12)
    return {"weight": (w / scale).to(torch.float8_e4m3fn), "weight_scale": scale, "input_scale": torch.tensor(0.01)}


def _fp8_entries(key: str, shape: tuple[int, ...], seed: int) -> Iterator[Entry]:
    """One FP8 linear: its weight and scales (the weight made once, when written)."""
    made: dict[str, torch.Tensor] = {}
    base = key[: -len(".weight")]
    for part, dtype, shp in (("weight", torch.float8_e4m3fn, shape), ("weight_scale", torch.float32, ()),
                             ("input_scale", torch.float32, ())):
        def make(part: str = part) -> torch.Tensor:
            if not made:
                made.update(_fp8(shape, seed))
            return made.pop(part)
        yield f"{base}.{part}", dtype, shp, make


def entries(cfg_json: dict, fp8: bool) -> list[Entry]:
    """Every checkpoint tensor: bf16, or with the layers' linears and experts in FP8 (one linear per expert)."""
    with torch.device("meta"):
        model = DiffusionGemma(parse_config(cfg_json))
    out: list[Entry] = []
    for seed, (name, t) in enumerate(model.state_dict().items()):
        key, shape = checkpoint_key(name), tuple(t.shape)
        if fp8 and name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            prefix, kind = key.rsplit(".", 1)
            e, rows, cols = shape
            parts = (("gate_proj", rows // 2), ("up_proj", rows // 2)) if kind == "gate_up_proj" else (
                ("down_proj", rows),)
            for i in range(e):
                for j, (part, n) in enumerate(parts):
                    out += _fp8_entries(f"{prefix}.{i}.{part}.weight", (n, cols), seed * 1000 + i * 3 + j)
        elif fp8 and name.startswith("layers.") and name.endswith(_FP8_LINEARS):
            out += _fp8_entries(key, shape, seed)
        else:
            out.append((key, torch.bfloat16, shape, lambda shape=shape, seed=seed: _random(shape, seed)))
    return out


def write_safetensors(path: Path, items: list[Entry]) -> int:
    """A safetensors file written tensor by tensor (each made just before it is written); returns its bytes."""
    header, offset = {}, 0
    for key, dtype, shape, _ in items:
        n = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[key] = {"dtype": _ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for key, dtype, shape, make in items:
            t = make()
            assert t.dtype == dtype and tuple(t.shape) == shape, key
            f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
    return path.stat().st_size


def write_checkpoint(dst: Path, cfg_json: dict, fp8: bool) -> int:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(cfg_json))
    if fp8:
        quant = {"quant_algo": "FP8", "kv_cache_quant_algo": None,
                 "exclude_modules": ["lm_head", "*router*", "*self_conditioning*", "*embed_tokens*"]}
        (dst / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "benchmarks/load_memory",
                                                                           "version": "0"}, "quantization": quant}))
    return write_safetensors(dst / "model.safetensors", entries(cfg_json, fp8))


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def measure(ckpt: Path, keep_quantized: bool) -> dict:
    """In this (fresh) process: load and report the peak RSS above the RSS after imports."""
    from service.model.loading import load_model

    base = _rss_kib()
    _, model = load_model(ckpt, dtype="bfloat16", device="cpu", keep_quantized=keep_quantized)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return {"peak_bytes": (peak - base) * 1024, "baseline_bytes": base * 1024, "model_bytes": held}


def run_measure(ckpt: Path, keep_quantized: bool) -> dict:
    cmd = [sys.executable, __file__, "--measure", str(ckpt)] + (["--keep-quantized"] if keep_quantized else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"measuring {ckpt} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="tiny widths (the smoke test), not the real ones")
    ap.add_argument("--dir", type=Path, help="where to write the checkpoints (default: a temporary directory)")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--keep-quantized", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure:
        print(json.dumps(measure(a.measure, a.keep_quantized)))
        return 0
    root = a.dir or Path(tempfile.mkdtemp(prefix="dgemma-load-memory-"))
    cfg_json = hf_config(a.layers, a.tiny)
    doc: dict = {"layers": a.layers, "widths": "tiny" if a.tiny else "real", "unit": "peak RSS / checkpoint bytes"}
    try:
        for label, fp8, keeps in (("bf16", False, (False,)), ("fp8", True, (True, False))):
            size = write_checkpoint(root / label, cfg_json, fp8)
            doc[f"{label}_checkpoint_bytes"] = size
            for keep in keeps:
                name = label if not fp8 else f"fp8_{'packed' if keep else 'dequantized'}"
                got = run_measure(root / label, keep)
                doc[f"{name}_peak_bytes"] = got["peak_bytes"]
                doc[f"{name}_ratio"] = round(got["peak_bytes"] / size, 3)
                if fp8 and not keep:
                    doc[f"{name}_ratio_to_model"] = round(got["peak_bytes"] / got["model_bytes"], 3)
    finally:
        if a.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    doc.update(machine())
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
