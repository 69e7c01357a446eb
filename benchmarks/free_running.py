"""Free-running agreement of builds with their source, by sampler setting: how far outputs drift apart when
both run the whole denoising loop with the same seeds, not just one decoder pass (`dgemma build`'s gate).

`python benchmarks/free_running.py SOURCE BUILD [BUILD ...] [--canvases 1] [--threads 2]` prints one JSON object.

For each build directory (made by `dgemma build`, loaded as `dgemma serve` would: dequantized at load on a CPU)
and each sampler setting, the 8 held-out prompts x seeds 0 and 1 run through the build and through SOURCE;
`sequence_agreement` is the fraction of equal output tokens position by position (engine_build.verify), over
`--canvases` canvases per request (a later canvas is conditioned on the earlier ones, so drift compounds).
Settings: near-greedy (temperature 0.01) at 8 and 48 steps, and the serving defaults (temperature 0.4-0.8,
48 steps). A bf16 build beside an FP8 one tells the drift that any change of the weights causes from the
drift that FP8 adds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine  # noqa: E402
from engine_build.calibration import heldout_prompts  # noqa: E402
from engine_build.verify import sequence_agreement  # noqa: E402
from service.engine.api import Request  # noqa: E402
from service.engine.registry import create_engine  # noqa: E402
from service.model.build_manifest import read_build  # noqa: E402

# (name, t_min, t_max, max_denoising_steps)
SETTINGS = [("near-greedy, 8 steps", 0.01, 0.01, 8), ("near-greedy, 48 steps", 0.01, 0.01, 48),
            ("serving defaults (t 0.4-0.8, 48 steps)", 0.4, 0.8, 48)]
SEEDS = (0, 1)


def outputs(engine, prompts: list[list[int]], canvases: int, t_min: float, t_max: float,
            steps: int) -> list[list[int]]:
    params = dataclasses.replace(engine.default_params, max_new_tokens=canvases * engine.config.canvas_length,
                                 max_denoising_steps=steps, t_min=t_min, t_max=t_max).validate()
    return [list(engine.generate(Request(prompt_ids=ids, params=params, seed=s)))[-1].token_ids
            for ids in prompts for s in SEEDS]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="the unquantized checkpoint the builds were made from")
    ap.add_argument("builds", type=Path, nargs="+", help="build directories (dgemma build --output)")
    ap.add_argument("--canvases", type=int, default=1, help="canvases per request (default: 1, as verify does)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    kw = dict(device="cpu", dtype="float32", threads=args.threads)
    started = time.monotonic()
    source = create_engine("torch", checkpoint_dir=args.source, **kw)
    prompts = [source.tokenizer.encode(p) for p in heldout_prompts()]
    ref = {name: outputs(source, prompts, args.canvases, lo, hi, steps) for name, lo, hi, steps in SETTINGS}
    results = []
    for build in args.builds:
        engine = create_engine("torch", checkpoint_dir=build, **kw)
        profile = read_build(build).get("profile", {}).get("name")
        agreement = {name: round(sequence_agreement(ref[name], outputs(engine, prompts, args.canvases, lo, hi,
                                                                       steps)), 4)
                     for name, lo, hi, steps in SETTINGS}
        results.append({"build": str(build), "profile": profile, "sequence_agreement": agreement})
    print(json.dumps({"benchmark": "free_running", "machine": machine(), "source": str(args.source),
                      "prompts": len(prompts), "seeds": list(SEEDS),
                      "canvases": args.canvases, "tokens_per_request": args.canvases * source.config.canvas_length,
                      "results": results,
                      "seconds": round(time.monotonic() - started, 1)}))


if __name__ == "__main__":
    main()
