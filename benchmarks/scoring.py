"""The scoring estimator's spread against its sample count, and what a score costs, on the embedded model.

`python benchmarks/scoring.py [--threads 2] [--seeds 8] [--snippets 8]` prints one JSON object. Each held-out
snippet (tests/assets/heldout_snippets.json) is scored as its 16-token gap after its 48-token prefix, once per seed,
at each sample count; `sum_sd` is the standard deviation of the summed estimate over seeds (mean over snippets),
`token_sd` the same per token, `sum_mean` the mean summed estimate. Requests go through the scheduler's thread,
submitted at once (they share decoder passes). `solo_ms`: one score at the default count, alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine  # noqa: E402
from service.cli import DEFAULT_CHECKPOINT  # noqa: E402
from service.engine.registry import create_engine  # noqa: E402
from service.engine.scoring import DEFAULT_SAMPLES, ScoreRequest  # noqa: E402

SNIPPETS = Path(__file__).resolve().parents[1] / "tests/assets/heldout_snippets.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--snippets", type=int, default=8)
    ap.add_argument("--counts", default="1,2,4,8,16,32")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    engine = create_engine(checkpoint_dir=DEFAULT_CHECKPOINT)
    snippets = json.loads(SNIPPETS.read_text())["snippets"][: a.snippets]
    sched = engine.scheduler.start()

    def run(reqs: list[ScoreRequest]) -> list[list[float]]:
        streams = [sched.submit(r) for r in reqs]
        return [list(s)[-1].logprobs.token for s in streams]

    t = time.perf_counter()
    run([ScoreRequest(snippets[0]["prefix"], snippets[0]["gap"], DEFAULT_SAMPLES)])
    solo_ms = (time.perf_counter() - t) * 1000
    rows = {}
    for k in [int(c) for c in a.counts.split(",")]:
        reqs = [ScoreRequest(s["prefix"], s["gap"], k, seed=seed) for s in snippets for seed in range(a.seeds)]
        t = time.perf_counter()
        out = run(reqs)
        wall = time.perf_counter() - t
        sums, token_sd, means = [], [], []
        for i in range(len(snippets)):
            runs = out[i * a.seeds : (i + 1) * a.seeds]
            sums.append(statistics.stdev(sum(r) for r in runs))
            means.append(statistics.mean(sum(r) for r in runs))
            token_sd.append(statistics.mean(statistics.stdev(col) for col in zip(*runs)))
        print(k, round(wall, 1), file=sys.stderr, flush=True)
        rows[k] = {"sum_sd": round(statistics.mean(sums), 3), "token_sd": round(statistics.mean(token_sd), 3),
                   "sum_mean": round(statistics.mean(means), 2),
                   "ms_per_score_batched": round(wall * 1000 / len(reqs), 1)}
    sched.stop()
    print(json.dumps({"machine": machine(), "threads": a.threads, "tokens": len(snippets[0]["gap"]),
                      "default_samples": DEFAULT_SAMPLES, "solo_ms": round(solo_ms, 1), "by_samples": rows}))


if __name__ == "__main__":
    main()
