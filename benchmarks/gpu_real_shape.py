"""The product's denoising step at the real 26B-A4B shape on one GPU, random weights.

UNVERIFIED: no GPU machine was available to the session that wrote this; it has not run on a GPU yet.

`python benchmarks/gpu_real_shape.py [--batches 1,4,16,32,64] [--steps 12] [--sampler fast]`
prints one JSON object: ms per denoising step and tokens/s per number of concurrent canvases, and
peak GPU memory. It drives the product's own path: requests go through the scheduler, which runs
each step on the TorchRunner (decoder pass, replayed from CUDA graphs, then the sampler's vocabulary
work in tiles on the GPU) and does the per-request bookkeeping. Each canvas runs `--steps` fixed
denoising steps (early stopping off); the timed steps are those after the batch is full and its graph
captured. bf16 only (the weights are made in bf16 on the device: about 47 GiB at this shape, no float32
copy); FP8 and NVFP4 weights come from the build stage (`engine_build`). `peak_memory_gib` is the steps'
peak, counted from after the load (`load_peak_memory_gib` is the load's); each result says how many CUDA graphs
were captured and replayed so far. `shared_prefix`: a burst of 32 requests sharing a 1,024-token prefix (8 steps)
against the same burst with a prefix of their own each, and the prefix cache's hit rate (`--prefix-requests 0`
skips it).
The shape (from derivative configs and GGUF metadata; the checkpoint's own config.json was not
available): hidden 2816, 16 heads, 30 layers (5 global: 5, 11, 17, 23, 29), sliding head dim 256 with
8 KV heads, global head dim 512 with 2 KV heads and K = V, dense MLP 2112, 128 experts top-8 of width
704, vocabulary 262,144, canvas 256. Every request has a 512-token prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.engine.api import Request  # noqa: E402
from service.engine.local import LocalEngine  # noqa: E402
from service.engine.scheduler import Limits  # noqa: E402
from service.engine.torch_runner import TorchRunner  # noqa: E402
from service.model.config import LayerSpec, ModelConfig  # noqa: E402
from service.model.network import DiffusionGemma  # noqa: E402
from service.sampler.params import GenerationParams  # noqa: E402

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


def random_model(cfg: ModelConfig, dev: torch.device) -> DiffusionGemma:
    """bf16 random weights allocated on `dev` directly: built on meta and cast there first, so no float32 copy
    (94 GiB at the real shape) ever exists."""
    with torch.device("meta"):
        model = DiffusionGemma(cfg).to(torch.bfloat16)
    model = model.to_empty(device=dev)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.ndim > 1 else p.fill_(1.0)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.fill_(1.0)
    model.reset_buffers()
    return model.eval()


def measure(engine: LocalEngine, canvases: int, prompt: int, steps: int, sampler: str, sync) -> dict:
    """`canvases` concurrent one-canvas requests; times the steps after the first two (prefill, capture)."""
    cfg = engine.config
    params = GenerationParams(max_new_tokens=cfg.canvas_length, max_denoising_steps=steps, stability_threshold=0,
                              confidence_threshold=0.0, sampler=sampler)
    g = torch.Generator().manual_seed(canvases)
    sched = engine.scheduler
    streams = [sched.submit(Request(torch.randint(3, cfg.vocab_size, (prompt,), generator=g).tolist(), params,
                                    seed=i)) for i in range(canvases)]
    for _ in range(2):
        sched.step()
    assert sched.canvases_in_last_pass == canvases
    sync()
    timed = steps - 3  # the last step commits (an encoder pass); not timed
    t = time.perf_counter()
    for _ in range(timed):
        sched.step()
    sync()
    ms = (time.perf_counter() - t) / timed * 1000
    while sched.step():
        pass
    assert all(s.next_event(timeout=0) is not None for s in streams)
    graphs = engine.runner.graphs
    return {"canvases": canvases, "ms_per_step": round(ms, 2),
            "tokens_per_s": round(canvases * cfg.canvas_length / (steps * ms / 1000), 1),
            "cuda_graph_captures": graphs.captures if graphs is not None else "no (CPU smoke run)",
            "cuda_graph_replays": graphs.replays if graphs is not None else "no (CPU smoke run)"}


def measure_shared_prefix(engine: LocalEngine, requests: int, prefix: int, question: int, steps: int, sync) -> dict:
    """A burst of `requests` one-canvas requests, each a `prefix`-token prefix and its own `question` tokens: once
    with one prefix shared by all (the prefix cache encodes it once), once with a prefix of their own each (no
    reuse: the same work without the cache). Wall time of each burst and the prefix cache's hit rate."""
    cfg = engine.config
    params = GenerationParams(max_new_tokens=cfg.canvas_length, max_denoising_steps=steps, stability_threshold=0,
                              confidence_threshold=0.0)
    g = torch.Generator().manual_seed(7)
    ids = lambda n: torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    shared = ids(prefix)
    out = {"requests": requests, "prefix_tokens": prefix, "question_tokens": question, "steps": steps}
    runs = [("warm_up", [ids(prefix) + ids(question) for _ in range(requests)]),  # captures the burst's graphs
            ("own_prefix", [ids(prefix) + ids(question) for _ in range(requests)]),
            ("shared_prefix", [shared + ids(question) for _ in range(requests)])]
    for name, prompts in runs:
        before = engine.runner.prefix_stats()
        sync()
        t = time.perf_counter()
        streams = [engine.scheduler.submit(Request(p, params, seed=i)) for i, p in enumerate(prompts)]
        while engine.scheduler.step():
            pass
        sync()
        after = engine.runner.prefix_stats()
        assert all(s.next_event(timeout=0) is not None for s in streams)
        if name == "warm_up":
            continue
        out[f"{name}_s"] = round(time.perf_counter() - t, 3)
        out[f"{name}_hit_rate"] = round((after["tokens_reused"] - before["tokens_reused"])
                                        / max(1, after["tokens_queried"] - before["tokens_queried"]), 4)
    out["speedup"] = round(out["own_prefix_s"] / out["shared_prefix_s"], 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", default="1,4,16,32,64")
    ap.add_argument("--steps", type=int, default=12, help="denoising steps per canvas (>= 4)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--sampler", default="fast", choices=["fast", "reference"])
    ap.add_argument("--tile-rows", type=int, default=None)
    ap.add_argument("--prefix-requests", type=int, default=32, help="the shared-prefix case's burst (0: skip it)")
    ap.add_argument("--smoke-cpu", action="store_true",
                    help="run the same code on the CPU at a toy shape (no graphs): a check, not a number")
    a = ap.parse_args()
    if a.steps < 4:
        ap.error("--steps must be >= 4")
    if a.smoke_cpu:
        dev, cfg = torch.device("cpu"), toy_config()
        a.prompt = 8
    elif not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device: this benchmark needs a GPU (H100 or newer)"}))
        return 2
    else:
        dev, cfg = torch.device("cuda"), real_config()
    runner = TorchRunner.from_model(cfg, random_model(cfg, dev), tile_rows=a.tile_rows)
    on_gpu = dev.type == "cuda"
    load_gib = None
    if on_gpu:  # the weights' own memory, then the steps' peak from here on
        torch.cuda.synchronize()
        load_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    batches = [int(x) for x in a.batches.split(",")]
    most = max(batches + [a.prefix_requests])
    # the default budget (85% of the memory free after the weights): the KV pool is allocated from it once
    limits = Limits(max_live_canvases=most, max_queue=most, max_prompt_tokens=2048)
    engine = LocalEngine(tempfile.mkdtemp(prefix="dgemma-random-"), runner, limits)  # no tokenizer, no gen config
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    results = []
    for batch in batches:
        try:
            results.append(measure(engine, batch, a.prompt, a.steps, a.sampler, sync))
        except torch.cuda.OutOfMemoryError as e:  # reported, and the larger buckets are not tried
            results.append({"canvases": batch, "error": f"out of memory: {e}"[:300]})
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
            break
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)  # kept in the log if a later bucket dies
    shared = None
    if a.prefix_requests:
        # the smoke run: a prefix of one chunk (256 tokens), a few requests
        prefix, question, n = (1024, 32, a.prefix_requests) if on_gpu else (256, 8, min(4, a.prefix_requests))
        try:
            shared = measure_shared_prefix(engine, n, prefix, question, 8, sync)
        except torch.cuda.OutOfMemoryError as e:
            shared = {"error": f"out of memory: {e}"[:300]}
        print(json.dumps(shared), file=sys.stderr, flush=True)
    print(json.dumps({
        "precision": "bf16", "sampler": a.sampler, "steps": a.steps, "prompt": a.prompt,
        "tile_rows": runner.tile_rows, "fixed_tile": runner.fixed_tile, "runner": runner.describe(),
        "device": torch.cuda.get_device_name() if on_gpu else "cpu (smoke run, not a measurement)",
        "load_peak_memory_gib": load_gib,  # while the random weights were made
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None,  # the steps'
        # peak since the load: weights, KV caches, graphs and sampler tiles
        "results": results,
        "shared_prefix": shared,  # 32 requests sharing a 1,024-token prefix, each with 32 tokens of its own
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
