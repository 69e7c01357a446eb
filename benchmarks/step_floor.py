"""How fast any sampler could make our engine on this machine: the ceiling on issue 3's CPU ratios.

`python benchmarks/step_floor.py [--threads 2] [--repeats 3]` prints one JSON object.

On the "small" config it times, per canvas and denoising step, (a) the reference's whole `generate`
step and (b) the work every step of this model must do whatever the sampler: our decoder pass over
the canvas, the soft-capped unembedding, the softmax, and the self-conditioning matmul for the next
step (no sampling, no entropy, no argmax). (a) / (b) bounds the tokens/s ratio any sampler on our
network code can reach here; both are measured in the same run, on the same random checkpoint.

It also measures how long (b)'s matrix multiplications alone take (the profiler's self time of the
GEMM kernels), and the ratio if everything else were free: the bound for any implementation that keeps
these float32 GEMMs, as bit-exactness with the reference does on this BLAS. And it counts (b)'s
floating-point operations with torch's FlopCounterMode and divides them by this
machine's best measured float32 GEMM rate ([256, 8192] x [8192, 256]): the step time if every FLOP ran
at that rate, and with it the ratio no float32 implementation of this model could pass here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import CANVAS, NO_EARLY_STOP, PROMPT, STEPS, best_time, machine, small_checkpoint  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from service.model.loading import load_model  # noqa: E402


GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def gemm_seconds(fn) -> float:
    """Self time of the GEMM kernels in one call of fn() (grouped matmuls count through their mm calls)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in GEMM_OPS) / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ref, path = small_checkpoint()
    _, model = load_model(path)
    g = torch.Generator().manual_seed(0)
    out: dict = {}
    with torch.no_grad():
        x, w = torch.randn(CANVAS, 8192), torch.randn(8192, 256)
        x @ w
        gemm_gflops = 2 * CANVAS * 8192 * 256 / best_time(lambda: x @ w, 20) / 1e9
        out["peak_gemm_gflops"] = round(gemm_gflops, 1)
        for b in (1, 8):
            prompts = torch.randint(3, 8192, (b, PROMPT), generator=g)
            caches = [model.new_cache(PROMPT + CANVAS) for _ in range(b)]
            model.encode(prompts, [PROMPT] * b, caches)
            canvas = torch.randint(0, 8192, (b, CANVAS), generator=g)
            soft = torch.zeros(b, CANVAS, model.cfg.hidden_size)

            def necessary() -> None:
                hidden = model.decode(canvas, soft, caches)  # [B, L, H]
                for row in hidden:  # one canvas's [L, V] at a time, as the engine does
                    model.soft_embedding(torch.softmax(model.logits(row), dim=-1))

            with FlopCounterMode(display=False) as fc:
                necessary()
            gemm_ms = min(gemm_seconds(necessary) for _ in range(a.repeats)) * 1e3 / b
            floor_ms = fc.get_total_flops() / b / (gemm_gflops * 1e6)
            ours_ms = 1e3 * best_time(necessary, a.repeats) / b

            def reference() -> None:
                torch.manual_seed(0)
                ref.generate(prompts, max_new_tokens=CANVAS, max_denoising_steps=STEPS,
                             confidence_threshold=NO_EARLY_STOP)

            ref_ms = 1e3 * best_time(reference, max(1, a.repeats - 1)) / (b * STEPS)
            out[f"reference_ms_per_canvas_step_batch{b}"] = round(ref_ms, 1)
            out[f"necessary_ms_per_canvas_step_batch{b}"] = round(ours_ms, 1)
            out[f"ratio_ceiling_batch{b}"] = round(ref_ms / ours_ms, 2)
            out[f"gemm_ms_per_canvas_step_batch{b}"] = round(gemm_ms, 1)
            out[f"ratio_if_only_gemms_batch{b}"] = round(ref_ms / gemm_ms, 2)
            out[f"gflop_per_canvas_step_batch{b}"] = round(fc.get_total_flops() / b / 1e9, 2)
            out[f"floor_ms_per_canvas_step_batch{b}"] = round(floor_ms, 1)
            out[f"ratio_at_peak_gemm_batch{b}"] = round(ref_ms / floor_ms, 2)
    out.update(steps=STEPS, canvas=CANVAS, prompt=PROMPT, **machine())
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
