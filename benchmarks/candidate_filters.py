"""What greedy, the candidate filters and log-probabilities cost in a step's vocabulary work
(service/sampler/tiles.py).

`python benchmarks/candidate_filters.py [--threads 2] [--repeats 5] [--device cuda] [--hidden 2816]` prints one
JSON object.

Times `sample_step` over one canvas (unembedding, softmax, entropy, argmax, candidate draw and the
self-conditioning matmul, in tiles) with a random unembedding, at the tiny model's shape and at the real
vocabulary, for: the fast sampler as is, greedy (temperature 0), top_k 50, and top_p 0.9 as a sorted-mass
filter prototyped here (not in the service): the cost that decided top_p (docs/api.md); and the fast sampler
with log-probabilities of 5 and 20 alternatives (`logprobs`). Then, at the real
vocabulary, one 64-row tile's row work alone (no GEMMs), which a loaded machine measures more steadily.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import best_time, machine  # noqa: E402
from service.sampler import ops, tiles  # noqa: E402
from service.sampler.tiles import CanvasDraw, Vocab, sample_step  # noqa: E402

SHAPES = {"tiny": dict(length=64, vocab=2048, hidden=64, tile=64),
          "real_vocab": dict(length=256, vocab=262144, hidden=64, tile=64)}


def top_p_candidates(probs: torch.Tensor, processed: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest set of largest probabilities holding mass p, as tiles.candidates returns them: one full
    sort per row (no cheaper exact way: the set's size is not known before the sort)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    return sorted_p.masked_fill(sorted_p.cumsum(dim=-1) - sorted_p > p, 0.0), order


def vocab_of(v: int, h: int, device: torch.device) -> Vocab:
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(v, h, generator=g) / h**0.5 * 8).to(device)  # logits of a few nats' spread
    return Vocab(logits=lambda rows: torch.tanh(rows @ w.T / 30) * 30, soft_embedding=lambda probs: probs @ w)


MODES = ("fast", "greedy", "top_k_50", "top_p_0.9", "logprobs_5", "logprobs_20")


def step_fn(shape: dict, mode: str, device: torch.device) -> Callable[[], None]:
    """One canvas's sample_step in `mode` (top_p 0.9 through the prototype above)."""
    vocab = vocab_of(shape["vocab"], shape["hidden"], device)
    hidden = torch.randn(1, shape["length"], shape["hidden"], generator=torch.Generator().manual_seed(1)).to(device)
    draw = CanvasDraw(torch.tensor(0.6, device=device), torch.Generator(device).manual_seed(2), False,
                      greedy=mode == "greedy", top_k=50 if mode == "top_k_50" else 0,
                      logprobs=int(mode.split("_")[1]) if mode.startswith("logprobs") else -1)

    def step() -> None:
        original = tiles.candidates
        if mode == "top_p_0.9":
            tiles.candidates = lambda probs, processed, k: top_p_candidates(probs, processed, 0.9)
        try:
            sample_step(vocab, hidden, [draw], shape["tile"])
        finally:
            tiles.candidates = original
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def time_modes(shape: dict, repeats: int, device: torch.device, modes: tuple[str, ...] = MODES) -> dict[str, float]:
    """Best wall time per mode, the modes interleaved in each round (a shared machine's load hits them alike)."""
    steps = {m: step_fn(shape, m, device) for m in modes}
    for f in steps.values():
        f()  # warm-up
    best = {m: float("inf") for m in modes}
    for _ in range(repeats):
        for m, f in steps.items():
            best[m] = min(best[m], best_time(f, 1))
    return best


def tile_ops(rows: int, v: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Milliseconds of one tile's row work [rows, V] (best of `repeats`, interleaved): the fast sampler's
    probabilities, entropy and draw, and what each filter adds to it."""
    processed = 4 * torch.randn(rows, v, generator=torch.Generator().manual_seed(3)).to(device)
    u = torch.rand(rows, generator=torch.Generator().manual_seed(4)).to(device)
    probs, _ = ops.fast_probs_and_entropy(processed)
    work = {
        "softmax_entropy": lambda: ops.fast_probs_and_entropy(processed),
        "draw": lambda: tiles.inverse_cdf_draw(probs, u),
        "top_k_50_draw": lambda: tiles._filtered(tiles.inverse_cdf_draw, probs, processed, 50, u),
        "top_p_0.9_draw": lambda: tiles.inverse_cdf_draw(top_p_candidates(probs, processed, 0.9)[0], u),
    }
    best = {k: float("inf") for k in work}
    for _ in range(repeats):
        for k, f in work.items():
            t = best_time(f, 1) if device.type != "cuda" else best_time(lambda: (f(), torch.cuda.synchronize()), 1)
            best[k] = min(best[k], t)
    return {k: round(t * 1e3, 2) for k, t in best.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=64, help="hidden size of the real-vocabulary shape")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    shapes = {**SHAPES, "real_vocab": {**SHAPES["real_vocab"], "hidden": a.hidden}}
    if device.type == "cuda":  # a whole canvas per tile, as a one-canvas step gets on a large accelerator
        shapes["real_vocab"]["tile"] = shapes["real_vocab"]["length"]
    out: dict = {"benchmark": "candidate_filters", **machine(), "device": str(device), "shapes": shapes,
                 "seconds_per_canvas_step": {}}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    for name, shape in shapes.items():
        times = time_modes(shape, a.repeats, device, tuple(a.modes.split(",")))
        out["seconds_per_canvas_step"][name] = {m: round(s, 5) for m, s in times.items()}
        out.setdefault("relative_to_fast", {})[name] = {m: round(s / times["fast"], 3) for m, s in times.items()}
    out["tile_ops_ms"] = {"rows": 64, "vocab": 262144, **tile_ops(64, 262144, 3 * a.repeats, device)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
