"""Soak: many concurrent clients against `dgemma serve` (the embedded model) on 127.0.0.1 for a while,
mixing streamed drafts, slow readers, client cancels, short deadlines and bad input. Prints one JSON object:
the calls by kind and status, the unexpected statuses (must be 0), p50/p99 latency of the calls that
finished, the front's and the backend's (tritonserver and its Python stub) RSS at start, after warm-up and at
the end, and the live-canvases gauge once the load stops (must be 0).

    python benchmarks/soak.py [--streams 64] [--seconds 60] [--threads 1]
    python benchmarks/soak.py --smoke     # a few seconds, 4 clients: checks that it runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Serve, machine, percentile  # noqa: E402
from service.api.diffusiongemma.v1 import diffusiongemma_pb2 as pb  # noqa: E402
from service.api.diffusiongemma.v1 import diffusiongemma_pb2_grpc as pb_grpc  # noqa: E402

C = grpc.StatusCode
OVERLOAD = {C.RESOURCE_EXHAUSTED}  # documented: the front's or the engine's limit reached
# what each kind of call may end with; anything else is unexpected
EXPECTED = {
    "stream": {C.OK} | OVERLOAD, "slow_reader": {C.OK} | OVERLOAD, "unary": {C.OK} | OVERLOAD,
    "cancel": {C.CANCELLED} | OVERLOAD, "deadline": {C.OK, C.DEADLINE_EXCEEDED} | OVERLOAD,
    "bad": {C.INVALID_ARGUMENT},
}
BAD = [pb.GenerateRequest(token_ids=pb.TokenIds(ids=[2, -5])), pb.GenerateRequest(text=""),
       pb.GenerateRequest(text="x", options=pb.GenerationOptions(parameters=pb.DiffusionParameters(
           max_denoising_steps=0))),
       pb.GenerateRequest(text="z" * 200_000), pb.GenerateRequest(model="other", text="x")]
CALL_TIMEOUT_S = 60.0


def small(steps: int = 4, tokens: int = 32, drafts: bool = False) -> pb.GenerateRequest:
    return pb.GenerateRequest(text="def ", max_new_tokens=tokens, return_drafts=drafts, options=pb.GenerationOptions(
        parameters=pb.DiffusionParameters(max_denoising_steps=steps)))


def one_call(stub, kind: str, rng: random.Random) -> C:
    try:
        if kind in ("stream", "slow_reader"):
            for _ in stub.GenerateStream(small(steps=8, tokens=64, drafts=True), timeout=CALL_TIMEOUT_S):
                if kind == "slow_reader":
                    time.sleep(0.05)
        elif kind == "unary":
            stub.Generate(small(), timeout=CALL_TIMEOUT_S)
        elif kind == "cancel":
            call = stub.GenerateStream(small(steps=100, tokens=512, drafts=True), timeout=CALL_TIMEOUT_S)
            for _ in range(rng.randint(1, 3)):
                next(call)
            call.cancel()
            return C.CANCELLED
        elif kind == "deadline":
            stub.Generate(small(steps=200, tokens=512), timeout=rng.uniform(0.05, 0.5))
        else:
            stub.Generate(rng.choice(BAD), timeout=CALL_TIMEOUT_S)
        return C.OK
    except grpc.RpcError as e:
        return e.code()


def rss_mb(root_pid: int) -> dict[str, float]:
    """RSS of the front (the `dgemma serve` process) and the backend (its descendants: tritonserver and the
    Python backend's stub), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))

    def rss(pid: int) -> float:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    backend, todo = 0.0, list(children.get(root_pid, []))
    while todo:
        pid = todo.pop()
        backend += rss(pid)
        todo += children.get(pid, [])
    return {"front": round(rss(root_pid), 1), "backend": round(backend, 1)}


def gauge(port: int, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    values = [s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]
    return sum(values) if values else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--streams", type=int, default=64, help="concurrent clients")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=None, help="seconds before the 'warm' RSS (default 1/6)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the engine")
    ap.add_argument("--smoke", action="store_true", help="4 clients for 4 seconds")
    a = ap.parse_args()
    if a.smoke:
        a.streams, a.seconds = 4, 4.0
    warmup = a.seconds / 6 if a.warmup is None else a.warmup
    with Serve(a.threads) as srv:
        channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
        stub = pb_grpc.DiffusionGemmaStub(channel)
        stub.Generate(small(), timeout=CALL_TIMEOUT_S)  # the first call loads lazily-built parts
        rss = {"start": rss_mb(srv.proc.pid)}
        counts: Counter = Counter()
        unexpected: list[str] = []
        latencies: list[float] = []
        lock = threading.Lock()
        start = time.monotonic()
        stop_at = start + a.seconds
        kinds = list(EXPECTED)

        def client(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < stop_at:
                kind = rng.choice(kinds)
                t = time.monotonic()
                code = one_call(stub, kind, rng)
                with lock:
                    counts[f"{kind}:{code.name}"] += 1
                    if code not in EXPECTED[kind]:
                        unexpected.append(f"{kind}:{code.name}")
                    elif code == C.OK and kind != "bad":
                        latencies.append(time.monotonic() - t)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(a.streams)]
        for t in threads:
            t.start()
        time.sleep(min(warmup, a.seconds))
        rss["warm"] = rss_mb(srv.proc.pid)
        for t in threads:
            t.join(a.seconds + CALL_TIMEOUT_S + 30)
        hung = sum(t.is_alive() for t in threads)
        elapsed = time.monotonic() - start
        # the load is over: the engine should hold no canvas within a few steps
        live, end = None, time.monotonic() + 30
        while time.monotonic() < end:
            live = gauge(srv.triton_metrics_port, "dgemma_live_canvases")
            if live == 0:
                break
            time.sleep(0.2)
        rss["end"] = rss_mb(srv.proc.pid)
        channel.close()
    calls = sum(counts.values())
    print(json.dumps({
        "benchmark": "soak", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "streams": a.streams, "seconds": round(elapsed, 1), "calls": calls,
        "calls_per_s": round(calls / elapsed, 1), "by_kind_status": dict(sorted(counts.items())),
        "unexpected": len(unexpected) + hung, "unexpected_examples": sorted(set(unexpected))[:10],
        "hung_clients": hung,
        "p50_ms": round(percentile(latencies, 50) * 1000, 1) if latencies else None,
        "p99_ms": round(percentile(latencies, 99) * 1000, 1) if latencies else None,
        "rss_mb": {part: {when: r[part] for when, r in rss.items()} for part in ("front", "backend")},
        "live_canvases_end": live, **machine(),
    }))
    return 0 if not unexpected and not hung and live == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
