"""What the HTTP front adds over the gRPC front: the same request through `POST /v1/completions` and `Generate`.

Starts `dgemma serve` (the embedded model) on 127.0.0.1, warms up, then alternates the two for `--requests`
requests each (one at a time, so the numbers are latency, not throughput; both check they got the same
token ids) and prints one JSON object: p50/p99 of each and the HTTP front's added p50 (the median of the
paired differences), in milliseconds. The same for a call that never reaches the model (`GET /v1/models`
against `ListModels`, `--light` times each), which shows the fronts' own cost without the engine's noise.

    python benchmarks/http_overhead.py [--requests 40] [--steps 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import grpc
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Serve, machine, percentile  # noqa: E402
from service.api.diffusiongemma.v1 import diffusiongemma_pb2 as pb  # noqa: E402
from service.api.diffusiongemma.v1 import diffusiongemma_pb2_grpc as pb_grpc  # noqa: E402

PROMPT = [2, 545, 226]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--steps", type=int, default=8, help="denoising steps per request (early stop off)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--light", type=int, default=200, help="model-free calls per front")
    a = ap.parse_args()
    with Serve(a.threads) as srv, httpx.Client(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=120) as http:
        stub = pb_grpc.DiffusionGemmaStub(grpc.insecure_channel(f"127.0.0.1:{srv.port}"))
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), max_new_tokens=64, options=pb.GenerationOptions(
            parameters=pb.DiffusionParameters(max_denoising_steps=a.steps, confidence_threshold=0.0), seed=1))
        body = {"prompt": PROMPT, "max_tokens": 64, "seed": 1, "max_denoising_steps": a.steps,
                "confidence_threshold": 0.0}

        def via_grpc() -> list[int]:
            return list(stub.Generate(request, timeout=120).choices[0].token_ids)

        def via_http() -> list[int]:
            r = http.post("/v1/completions", json=body)
            r.raise_for_status()
            return r.json()["choices"][0]["token_ids"]

        for _ in range(3):
            assert via_grpc() == via_http(), "the two fronts disagree"
        times: dict[str, list[float]] = {"grpc": [], "http": [], "grpc_models": [], "http_models": []}

        def measure(count: int, pairs) -> None:
            for _ in range(count):
                for name, fn in pairs:
                    t0 = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t0) * 1000)

        measure(a.requests, (("http", via_http), ("grpc", via_grpc)))
        measure(a.light, (("http_models", lambda: http.get("/v1/models").raise_for_status()),
                          ("grpc_models", lambda: stub.ListModels(pb.ListModelsRequest(), timeout=10))))
    out = {"date": time.strftime("%Y-%m-%d"), **machine(), "engine_threads": a.threads, "requests": a.requests,
           "steps": a.steps, "canvas": 64}
    for name, xs in times.items():
        out[f"{name}_p50_ms"] = round(percentile(xs, 50), 2)
        out[f"{name}_p99_ms"] = round(percentile(xs, 99), 2)
    for kind in ("", "_models"):
        pairs = zip(times["http" + kind], times["grpc" + kind])
        out[f"http{kind}_added_p50_ms"] = round(statistics.median(h - g for h, g in pairs), 2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
