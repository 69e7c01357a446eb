"""The batched decoder pass with experts shared across sequences against experts run per sequence.

`python benchmarks/expert_sharing.py [--threads 2] [--rounds 4]` prints one JSON object.

On the "small" config it times our decoder pass over 8 and 16 canvases both ways, alternating, in the
same process (best of --rounds), and checks the two give the same bits. "Per sequence" is what the
engine did before sharing (one grouped GEMM call per sequence and projection).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import CANVAS, PROMPT, best_time, machine, small_checkpoint  # noqa: E402
from service.model.layers import Experts  # noqa: E402
from service.model.loading import load_model  # noqa: E402


def per_sequence_calls(self: Experts, flat: torch.Tensor, k: int, seq_len: int | None) -> list[torch.Tensor]:
    every = torch.arange(flat.numel())
    step = flat.numel() if seq_len is None else seq_len * k
    return [every[s : s + step] for s in range(0, flat.numel(), step)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    _, path = small_checkpoint()
    _, model = load_model(path)
    model.batch_invariant = True  # "shared" here is the batch-invariant sharing (Experts._calls)
    shared_calls = Experts._calls
    g = torch.Generator().manual_seed(0)
    out: dict = {}
    with torch.no_grad():
        for b in (8, 16):
            caches = [model.new_cache(PROMPT + CANVAS) for _ in range(b)]
            model.encode(torch.randint(3, 8192, (b, PROMPT), generator=g), [PROMPT] * b, caches)
            canvas = torch.randint(0, 8192, (b, CANVAS), generator=g)
            soft = torch.zeros(b, CANVAS, model.cfg.hidden_size)
            best = {"shared": float("inf"), "per_sequence": float("inf")}
            hidden = {}
            for _ in range(a.rounds):
                for name, calls in (("per_sequence", per_sequence_calls), ("shared", shared_calls)):
                    Experts._calls = calls
                    hidden[name] = model.decode(canvas, soft, caches)
                    best[name] = min(best[name], best_time(lambda: model.decode(canvas, soft, caches), 1))
            Experts._calls = shared_calls
            out[f"per_sequence_ms_per_canvas_batch{b}"] = round(best["per_sequence"] * 1e3 / b, 1)
            out[f"shared_ms_per_canvas_batch{b}"] = round(best["shared"] * 1e3 / b, 1)
            out[f"speedup_batch{b}"] = round(best["per_sequence"] / best["shared"], 2)
            out[f"same_bits_batch{b}"] = bool(torch.equal(hidden["shared"], hidden["per_sequence"]))
    out.update(canvas=CANVAS, rounds=a.rounds, **machine())
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
