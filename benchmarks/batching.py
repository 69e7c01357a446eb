"""Aggregate tokens/s and request latency at 1, 4 and 16 concurrent requests with mixed settings.

`python benchmarks/batching.py [--threads 2] [--sampler reference|fast]` prints one JSON object.
Requests go through the scheduler's background thread, submitted at once; settings vary per request
(steps, entropy bound, temperatures, canvases, prompt length). The "small" checkpoint as in
reference_speed.py; early stopping left on (default confidence threshold).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import CANVAS, machine, small_checkpoint  # noqa: E402
from service.engine.api import FinalEvent, Request  # noqa: E402
from service.engine.scheduler import Limits, Scheduler  # noqa: E402
from service.engine.registry import create_engine  # noqa: E402
from service.sampler.params import GenerationParams  # noqa: E402


def mixed(i: int, sampler: str) -> Request:
    g = torch.Generator().manual_seed(i)
    prompt = torch.randint(3, 8192, (16 + 16 * (i % 4),), generator=g).tolist()
    params = GenerationParams(
        max_new_tokens=CANVAS * (1 + i % 2), max_denoising_steps=(8, 12, 16)[i % 3],
        entropy_bound=(0.1, 0.3)[i % 2], t_min=(0.4, 0.2)[i % 2], t_max=(0.8, 1.0)[i % 2], sampler=sampler,
    )
    return Request(prompt, params, seed=i)


def run_level(sched: Scheduler, n: int, sampler: str) -> dict:
    latencies: list[float] = [0.0] * n
    tokens: list[int] = [0] * n

    def client(i: int) -> None:
        t = time.perf_counter()
        for ev in sched.generate(mixed(i, sampler)):
            if isinstance(ev, FinalEvent):
                tokens[i] = len(ev.token_ids)
        latencies[i] = time.perf_counter() - t

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=600)
    wall = time.perf_counter() - start
    lat = sorted(latencies)
    return {
        "concurrency": n,
        "aggregate_tokens_per_s": round(sum(tokens) / wall, 1),
        "p50_latency_s": round(statistics.median(lat), 3),
        "p99_latency_s": round(lat[min(n - 1, int(round(0.99 * (n - 1))))], 3),
        "wall_s": round(wall, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sampler", default="reference", choices=["reference", "fast"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    _, path = small_checkpoint()
    engine = create_engine(checkpoint_dir=path)
    sched = Scheduler(engine, Limits(max_live_canvases=16)).start()
    try:
        run_level(sched, 1, a.sampler)  # warm-up
        levels = [run_level(sched, n, a.sampler) for n in (1, 4, 16)]
    finally:
        sched.stop()
    print(json.dumps({"levels": levels, "sampler": a.sampler, "canvas": CANVAS, **machine()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
