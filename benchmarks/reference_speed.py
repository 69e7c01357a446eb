"""Our engine's tokens/s against the reference's `generate`, same random checkpoint, same run.

`ours_*` and `ratio_*` are the serving default (the fast sampler); `*_reference_sampler_*` the opt-in
sampler whose ids equal the reference's.

`python benchmarks/reference_speed.py [--repeats 2] [--threads 2]` prints one JSON object.
The "small" config: vocab 8192, hidden 256, 6 layers (last global), 8 experts top-2, canvas 256,
prompt 64, 16 fixed steps (early stopping disabled), float32. Times are the best of --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import CANVAS, NO_EARLY_STOP, PROMPT, STEPS, best_time, machine, small_checkpoint  # noqa: E402
from service.engine.api import Request  # noqa: E402
from service.engine.local import LocalEngine  # noqa: E402
from service.engine.scheduler import Limits, Scheduler  # noqa: E402
from service.engine.registry import create_engine  # noqa: E402
from service.sampler.params import GenerationParams  # noqa: E402


def ours(engine: LocalEngine, prompts: list[list[int]], sampler: str, repeats: int) -> float:
    params = GenerationParams(max_new_tokens=CANVAS, max_denoising_steps=STEPS,
                              confidence_threshold=NO_EARLY_STOP, sampler=sampler)
    reqs = [Request(p, params, seed=i) for i, p in enumerate(prompts)]

    def run() -> None:
        if len(reqs) == 1:
            list(engine.generate(reqs[0]))
            return
        sched = Scheduler(engine, Limits(max_live_canvases=len(reqs)))
        streams = [sched.submit(r) for r in reqs]
        while sched.step():
            pass
        assert all(s.next_event(timeout=0) is not None for s in streams)

    return len(reqs) * CANVAS / best_time(run, repeats)


def reference(ref, prompts: list[list[int]], repeats: int) -> float:
    ids = torch.tensor(prompts)

    def run() -> None:
        torch.manual_seed(0)
        ref.generate(ids, max_new_tokens=CANVAS, max_denoising_steps=STEPS, confidence_threshold=NO_EARLY_STOP)

    return len(prompts) * CANVAS / best_time(run, repeats)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ref, path = small_checkpoint()
    engine = create_engine(checkpoint_dir=path)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 8192, (PROMPT,), generator=g).tolist() for _ in range(8)]
    with torch.no_grad():
        ours(engine, prompts[:1], "fast", 1)  # warm-up
        out = {
            "ours_batch1": ours(engine, prompts[:1], "fast", a.repeats),
            "ours_batch8": ours(engine, prompts, "fast", a.repeats),
            "reference_batch1": reference(ref, prompts[:1], a.repeats),
            "reference_batch8": reference(ref, prompts, a.repeats),
            "ours_reference_sampler_batch1": ours(engine, prompts[:1], "reference", a.repeats),
            "ours_reference_sampler_batch8": ours(engine, prompts, "reference", a.repeats),
        }
    out = {k: round(v, 1) for k, v in out.items()}
    for kind in ("", "_reference_sampler"):
        for b in (1, 8):
            out[f"ratio{kind}_batch{b}"] = round(out[f"ours{kind}_batch{b}"] / out[f"reference_batch{b}"], 2)
    out.update(unit="generated tokens/s", steps=STEPS, canvas=CANVAS, prompt=PROMPT, repeats=a.repeats,
               **machine())
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
