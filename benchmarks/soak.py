"""Soak: many concurrent clients against `dgemma serve` (the embedded model) on 127.0.0.1 for a while,
mixing streamed drafts, slow readers, client cancels, short deadlines and bad input, and a hostile mix:
extreme parameter values on both fronts, HTTP bodies sent too slowly, idle connections to every port (gRPC,
HTTP, metrics) and HTTP streams dropped mid-way. Prints one JSON object: the calls by kind and outcome, the
unexpected outcomes (must be 0), p50/p99 latency of the calls that finished, the front's and the backend's
(tritonserver and its Python stub) RSS and thread counts at start, after warm-up and at the end, the backend
restarts (must be 0), ERROR lines in the server's log (must be 0), and the live-canvases gauge once the load
stops (must be 0).

    python benchmarks/soak.py [--streams 64] [--seconds 60] [--threads 1]
    python benchmarks/soak.py --smoke     # a few seconds, 6 clients: checks that it runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import socket
import sys
import threading
import time
import urllib.error
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
OVERLOAD = {"RESOURCE_EXHAUSTED"}  # documented: the front's or the engine's limit reached
HTTP_OVERLOAD = {"HTTP_429"}
# what each kind of call may end with (a gRPC status name, HTTP_<status>, or a connection's fate); anything
# else is unexpected
EXPECTED = {
    "stream": {"OK"} | OVERLOAD, "slow_reader": {"OK"} | OVERLOAD, "unary": {"OK"} | OVERLOAD,
    "cancel": {"CANCELLED"} | OVERLOAD, "deadline": {"OK", "DEADLINE_EXCEEDED"} | OVERLOAD,
    "bad": {"INVALID_ARGUMENT"},
    # the hostile mix
    "extreme": {"INVALID_ARGUMENT"}, "http_extreme": {"HTTP_400"},
    "slow_body": {"HTTP_408", "CLOSED"},  # refused or dropped once the body read times out
    "idle": {"OK"},  # idle connections held to every port; the metrics port still answers meanwhile
    # an HTTP stream read a little, then the connection dropped; its X-Request-Timeout bounds the wait for the
    # first canvas when the engine is backed up (504)
    "http_drop": {"OK", "HTTP_504"} | HTTP_OVERLOAD,
}
EXTREME_PARAMS = [dict(stability_threshold=10**8), dict(stability_threshold=2**31 - 1), dict(t_max=1e-45),
                  dict(t_min=3e38, t_max=3e38), dict(entropy_bound=float("inf")), dict(confidence_threshold=float("nan")),
                  dict(max_denoising_steps=2**31 - 1)]
EXTREME_HTTP = [{"stability_threshold": 2**40}, {"stability_threshold": 10**7}, {"max_tokens": 2**63},
                {"t_max": 1e300}, {"n": 10**9}, {"seed": -1}, {"temperature": 5}, {"prompt": {"a": 1}},
                {"max_denoising_steps": "many"}]
BODY_TIMEOUT_S = 5.0  # the server's NIM_HTTP_BODY_TIMEOUT in the soak
SLOW_BODY_WAIT_S = 60.0  # the longest a slow-body client waits for the server's answer
BAD = [pb.GenerateRequest(token_ids=pb.TokenIds(ids=[2, -5])), pb.GenerateRequest(text=""),
       pb.GenerateRequest(text="x", options=pb.GenerationOptions(parameters=pb.DiffusionParameters(
           max_denoising_steps=0))),
       pb.GenerateRequest(text="z" * 200_000), pb.GenerateRequest(model="other", text="x")]
CALL_TIMEOUT_S = 60.0


def small(steps: int = 4, tokens: int = 32, drafts: bool = False) -> pb.GenerateRequest:
    return pb.GenerateRequest(text="def ", max_new_tokens=tokens, return_drafts=drafts, options=pb.GenerationOptions(
        parameters=pb.DiffusionParameters(max_denoising_steps=steps)))


def http_status(port: int, path: str, body: dict, timeout: float = CALL_TIMEOUT_S) -> str:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return f"HTTP_{r.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP_{e.code}"
    except OSError:
        return "CLOSED"


def slow_body(port: int, rng: random.Random) -> str:
    """Headers announcing a body, then a few bytes of it, then nothing: the server must answer or drop."""
    with socket.create_connection(("127.0.0.1", port), timeout=SLOW_BODY_WAIT_S) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 4096\r\n\r\n{\"prompt\": ")
        for _ in range(rng.randint(0, 3)):
            time.sleep(0.5)
            s.sendall(b" ")
        try:
            head = s.recv(64)
        except TimeoutError:
            return "NO_ANSWER"
        except OSError:
            return "CLOSED"
    return f"HTTP_{head.split()[1].decode()}" if head.startswith(b"HTTP/1.1 ") else "CLOSED" if not head else "GARBLED"


def idle(ports: list[int], metrics_port: int, rng: random.Random) -> str:
    """Idle TCP connections to every port for a while; meanwhile the metrics port still answers."""
    socks = [socket.create_connection(("127.0.0.1", p), timeout=5) for p in ports for _ in range(3)]
    try:
        time.sleep(rng.uniform(1, 5))
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            r.read()
        return "OK"
    except OSError:
        return "METRICS_DOWN"
    finally:
        for s in socks:
            s.close()


def http_drop(port: int) -> str:
    """A streamed completion read up to its first bytes, then the connection closed under it."""
    body = json.dumps({"prompt": "def ", "max_tokens": 256, "max_denoising_steps": 50, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=CALL_TIMEOUT_S) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"X-Request-Timeout: " + str(CALL_TIMEOUT_S / 2).encode() + b"\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        head = s.recv(64)
    return "OK" if head.startswith(b"HTTP/1.1 200") else f"HTTP_{head.split()[1].decode()}" if head else "CLOSED"


def one_call(stub, kind: str, rng: random.Random, srv) -> str:
    if kind == "http_extreme":
        return http_status(srv.http_port, "/v1/completions", {"prompt": "x", "max_tokens": 8, **rng.choice(EXTREME_HTTP)})
    if kind == "slow_body":
        return slow_body(srv.http_port, rng)
    if kind == "idle":
        return idle([srv.port, srv.http_port, srv.metrics_port], srv.metrics_port, rng)
    if kind == "http_drop":
        return http_drop(srv.http_port)
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
            return "CANCELLED"
        elif kind == "deadline":
            stub.Generate(small(steps=200, tokens=512), timeout=rng.uniform(0.05, 0.5))
        elif kind == "extreme":
            req = small()
            for k, v in rng.choice(EXTREME_PARAMS).items():
                setattr(req.options.parameters, k, v)
            stub.Generate(req, timeout=CALL_TIMEOUT_S)
        else:
            stub.Generate(rng.choice(BAD), timeout=CALL_TIMEOUT_S)
        return "OK"
    except grpc.RpcError as e:
        return e.code().name


def rss_mb(root_pid: int, field: str = "VmRSS") -> dict[str, float]:
    """RSS (MB; or another /proc status `field`, e.g. Threads) of the front (the `dgemma serve` process) and the
    backend (its descendants: tritonserver and the Python backend's stub), from /proc."""
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
                if line.startswith(field + ":"):
                    n = int(line.split()[1])
                    return n / 1024 if field == "VmRSS" else n
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
        a.streams, a.seconds = 6, 4.0
    warmup = a.seconds / 6 if a.warmup is None else a.warmup
    # slow-body clients wait out the body timeout: a short one keeps them cycling
    with Serve(a.threads, env={"NIM_HTTP_BODY_TIMEOUT": str(BODY_TIMEOUT_S)}) as srv:
        channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
        stub = pb_grpc.DiffusionGemmaStub(channel)
        stub.Generate(small(), timeout=CALL_TIMEOUT_S)  # the first call loads lazily-built parts
        rss = {"start": rss_mb(srv.proc.pid)}
        threads_n = {"start": rss_mb(srv.proc.pid, "Threads")}
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
                try:
                    code = one_call(stub, kind, rng, srv)
                except OSError as e:  # a connection of the client's own that the server refused or reset
                    code = f"SOCKET_{type(e).__name__}"
                with lock:
                    counts[f"{kind}:{code}"] += 1
                    if code not in EXPECTED[kind]:
                        unexpected.append(f"{kind}:{code}")
                    elif code == "OK" and kind in ("stream", "slow_reader", "unary"):
                        latencies.append(time.monotonic() - t)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(a.streams)]
        for t in threads:
            t.start()
        time.sleep(min(warmup, a.seconds))
        rss["warm"] = rss_mb(srv.proc.pid)
        threads_n["warm"] = rss_mb(srv.proc.pid, "Threads")
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
        threads_n["end"] = rss_mb(srv.proc.pid, "Threads")
        restarts = gauge(srv.metrics_port, "dgemma_front_backend_restarts_total") or 0
        load_log_bytes = srv.log.stat().st_size
        channel.close()
    # the log up to the end of the load is the load's; what the shutdown (SIGTERM) adds is reported apart
    raw = srv.log.read_bytes() if srv.log.exists() else b""
    bad = lambda text: [ln for ln in text.decode(errors="replace").splitlines()  # noqa: E731
                        if " ERROR " in ln or '"level": "ERROR"' in ln or "Traceback" in ln]
    errors, shutdown_errors = bad(raw[:load_log_bytes]), bad(raw[load_log_bytes:])
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
        "thread_counts": {part: {when: r[part] for when, r in threads_n.items()} for part in ("front", "backend")},
        "backend_restarts": restarts, "error_log_lines": len(errors), "error_log_examples": errors[:3],
        "shutdown_error_lines": shutdown_errors[:3],
        "live_canvases_end": live, **machine(),
    }))
    return 0 if not unexpected and not hung and live == 0 and not restarts and not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
