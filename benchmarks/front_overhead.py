"""What the public gRPC front costs: the same requests through the front and straight to Triton's stream.

Starts `dgemma serve` (the embedded model) on 127.0.0.1, warms up, then alternates the two paths for
`--requests` requests each (one at a time, so the numbers are latency, not throughput) and prints one
JSON object: p50/p99 latency of each path and the front's added p50, in milliseconds.

    python benchmarks/front_overhead.py [--requests 40] [--steps 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc as triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Serve, machine, percentile  # noqa: E402
from service.api.diffusiongemma.v1 import diffusiongemma_pb2 as pb  # noqa: E402
from service.api.diffusiongemma.v1 import diffusiongemma_pb2_grpc as pb_grpc  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--steps", type=int, default=8, help="denoising steps per request (early stop off)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    with Serve(a.threads) as srv:
        port, triton_port = srv.port, srv.triton_port
        stub = pb_grpc.DiffusionGemmaStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        params = pb.DiffusionParameters(max_denoising_steps=a.steps, confidence_threshold=0.0)
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[2, 545, 226]), max_new_tokens=64,
                                     options=pb.GenerationOptions(parameters=params, seed=1))
        client = triton.InferenceServerClient(f"127.0.0.1:{triton_port}")
        results: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: results.put((result, error)))

        def direct() -> None:
            inputs = []
            for name, value, kind in (("input_ids", np.array([2, 545, 226], np.int32), "INT32"),
                                      ("max_new_tokens", np.array([64], np.int32), "INT32"),
                                      ("max_denoising_steps", np.array([a.steps], np.int32), "INT32"),
                                      ("confidence_threshold", np.array([0.0], np.float32), "FP32"),
                                      ("seed", np.array([1], np.uint64), "UINT64")):
                i = triton.InferInput(name, list(value.shape), kind)
                i.set_data_from_numpy(value)
                inputs.append(i)
            client.async_stream_infer("diffusiongemma", inputs)
            while True:
                result, error = results.get(timeout=120)
                assert error is None, error
                if result.as_numpy("event")[0] == b"final":
                    return

        def front() -> None:
            assert stub.Generate(request, timeout=120).choices

        for _ in range(3):
            direct()
            front()
        times: dict[str, list[float]] = {"front": [], "triton": []}
        for _ in range(a.requests):
            for name, fn in (("front", front), ("triton", direct)):
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1000)
        client.stop_stream()
        out = {"date": time.strftime("%Y-%m-%d"), **machine(), "engine_threads": a.threads, "requests": a.requests,
               "steps": a.steps, "canvas": 64}
        for name, xs in times.items():
            out[f"{name}_p50_ms"] = round(percentile(xs, 50), 2)
            out[f"{name}_p99_ms"] = round(percentile(xs, 99), 2)
        out["front_added_p50_ms"] = round(statistics.median(f - t for f, t in zip(times["front"], times["triton"])), 2)
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
