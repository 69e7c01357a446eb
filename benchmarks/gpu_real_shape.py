"""Decoder-step speed at the real 26B-A4B shape on one GPU, random weights.

UNVERIFIED: no GPU machine was available to the session that wrote this; it has not run yet.

`python benchmarks/gpu_real_shape.py [--precision bf16|fp8] [--batches 1,4,16,32] [--steps 16]`
prints one JSON object: ms per decoder step and tokens/s per batch size, and peak memory.

- bf16: our DiffusionGemma network at the real shape, experts as grouped GEMMs.
- fp8 (Hopper): every linear and expert weight stored float8_e4m3fn with a per-output-row scale,
  multiplied with torch._scaled_mm / torch._scaled_grouped_mm (activations quantized per row).
- Each batch size ("bucket") is captured once as a CUDA graph and replayed for the timed steps.
The shape (from derivative configs and GGUF metadata; the checkpoint's own config.json was not
available): hidden 2816, 16 heads, 30 layers (5 global: 5, 11, 17, 23, 29), sliding head dim 256 with
8 KV heads, global head dim 512 with 2 KV heads and K = V, dense MLP 2112, 128 experts top-8 of width
704, vocabulary 262,144, canvas 256. A 512-token prompt is cached for every canvas.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.model.config import LayerSpec, ModelConfig  # noqa: E402
from service.model.network import DiffusionGemma  # noqa: E402

GLOBAL = {5, 11, 17, 23, 29}


def real_config() -> ModelConfig:
    layers = tuple(
        LayerSpec(sliding=False, head_dim=512, num_kv_heads=2, rope_theta=1e6, rope_type="proportional",
                  partial_rotary_factor=0.25, rope_factor=1.0)
        if i in GLOBAL else
        LayerSpec(sliding=True, head_dim=256, num_kv_heads=8, rope_theta=1e4, rope_type="default",
                  partial_rotary_factor=1.0, rope_factor=1.0)
        for i in range(30)
    )
    return ModelConfig(vocab_size=262_144, hidden_size=2816, intermediate_size=2112, num_layers=30, num_heads=16,
                       num_experts=128, top_k_experts=8, moe_intermediate_size=704, sliding_window=1024,
                       rms_norm_eps=1e-6, final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
                       canvas_length=256, layers=layers, dtype="bfloat16")


def toy_config() -> ModelConfig:
    small = LayerSpec(sliding=True, head_dim=16, num_kv_heads=2, rope_theta=1e4, rope_type="default",
                      partial_rotary_factor=1.0, rope_factor=1.0)
    big = LayerSpec(sliding=False, head_dim=32, num_kv_heads=1, rope_theta=1e6, rope_type="proportional",
                    partial_rotary_factor=0.25, rope_factor=1.0)
    return ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                       num_experts=8, top_k_experts=2, moe_intermediate_size=32, sliding_window=16,
                       rms_norm_eps=1e-6, final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
                       canvas_length=32, layers=(small, big), dtype="bfloat16")


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] -> float8 weights and float32 scales [..., out]."""
    scale = w.abs().amax(dim=-1).float().clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
    return (w.float() / scale[..., None]).to(torch.float8_e4m3fn), scale


def fp8_linear(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xs = x2.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
    xq = (x2.float() / xs).to(torch.float8_e4m3fn)
    out = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws[None, :], out_dtype=torch.bfloat16)
    return out.reshape(*shape[:-1], -1)


def to_fp8(model: DiffusionGemma) -> None:
    """Swap every nn.Linear for an FP8 one (experts stay grouped bf16 unless _scaled_grouped_mm exists)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child.weight.shape[0] % 16 == 0:
                wq, ws = quantize_rows(child.weight.data)

                class FP8Linear(torch.nn.Module):
                    def __init__(self, wq: torch.Tensor, ws: torch.Tensor) -> None:
                        super().__init__()
                        self.wq, self.ws = wq, ws

                    def forward(self, x: torch.Tensor) -> torch.Tensor:
                        return fp8_linear(x, self.wq, self.ws)

                setattr(module, name, FP8Linear(wq, ws))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--precision", default="fp8", choices=["bf16", "fp8"])
    ap.add_argument("--batches", default="1,4,16,32")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--smoke-cpu", action="store_true",
                    help="run the same code on the CPU at a toy shape (bf16, no graphs, no FP8): a check, not a number")
    a = ap.parse_args()
    if a.smoke_cpu:
        dev, cfg = torch.device("cpu"), toy_config()
        a.precision, a.prompt = "bf16", 8
    elif not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device: this benchmark needs a GPU (H100 or newer)"}))
        return 2
    else:
        dev, cfg = torch.device("cuda"), real_config()
    with torch.device("meta"):
        model = DiffusionGemma(cfg)
    model = model.to_empty(device=dev).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.ndim > 1 else p.fill_(1.0)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.fill_(1.0)
    model.reset_buffers()
    model.eval()
    if a.precision == "fp8":
        to_fp8(model)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    results = []
    for batch in [int(x) for x in a.batches.split(",")]:
        caches = [model.new_cache(a.prompt + cfg.canvas_length) for _ in range(batch)]
        prompt = torch.randint(0, cfg.vocab_size, (batch, a.prompt), device=dev)
        model.encode(prompt, [a.prompt] * batch, caches)
        canvas = torch.randint(0, cfg.vocab_size, (batch, cfg.canvas_length), device=dev)
        soft = torch.zeros(batch, cfg.canvas_length, cfg.hidden_size, device=dev, dtype=torch.bfloat16)

        def step() -> None:
            hidden = model.decode(canvas, soft, caches)
            for r in range(batch):  # the step's vocabulary work, one canvas at a time
                logits = model.logits(hidden[r])
                probs = torch.softmax(logits / 0.6, dim=-1)
                soft[r] = model.soft_embedding(probs)

        for _ in range(2):
            step()
        sync()
        run, graphed = step, "no (CPU smoke run)"
        if dev.type == "cuda":
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    step()
                run, graphed = graph.replay, True
            except Exception as e:  # a capture failure is reported, not hidden
                run, graphed = step, f"eager ({type(e).__name__}: {e})"
        sync()
        t = time.perf_counter()
        for _ in range(a.steps):
            run()
        sync()
        ms = (time.perf_counter() - t) / a.steps * 1000
        results.append({"canvases": batch, "ms_per_step": round(ms, 2),
                        "tokens_per_s": round(batch * cfg.canvas_length / (a.steps * ms / 1000), 1),
                        "cuda_graph": graphed})
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)  # kept in the log if a later bucket dies
    experts = "bf16 (grouped)"  # FP8 grouped experts (_scaled_grouped_mm) are not wired yet
    on_gpu = dev.type == "cuda"
    print(json.dumps({
        "precision": a.precision, "experts_precision": experts, "steps": a.steps,
        "device": torch.cuda.get_device_name() if on_gpu else "cpu (smoke run, not a measurement)",
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None,
        "results": results,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
