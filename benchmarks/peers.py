"""The field's own tools, unmodified, against `dgemma serve`: guidellm, lm-evaluation-harness, LangChain's
ChatOpenAI and grpcurl (and NVIDIA's genai-perf where it can run: see docs/benchmarks.md).

Starts `dgemma serve` (the embedded tiny model) on free 127.0.0.1 ports with gRPC reflection on, then runs each
tool as a subprocess from .venv-peers (`make peers`; the tools need numpy>=2, the project caps it below 2), each
bounded in time, and prints one JSON object: per tool `ok`, the commands it ran, the tool's own reported numbers
(read from its own output files), the exact error when it failed, and what the server saw while it ran (calls by
route and status from the server's own metrics, fields it ignored, and the error messages it answered, from its
log). Nothing is worked around: a request a tool sends that the server refuses is reported as the failure it is.

    python benchmarks/peers.py [--smoke] [--only guidellm --only lm_eval ...] [--threads 1]

Offline: the tools get HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1; guidellm's tokenizer is the embedded
checkpoint's tokenizer.json (with a minimal tokenizer_config.json), lm-eval's task and data are the local files in
benchmarks/peers/.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import Serve  # noqa: E402

PEERS = ROOT / "benchmarks" / "peers"
TOKENIZER = ROOT / "service" / "assets" / "tiny-diffusiongemma" / "tokenizer.json"
MODEL = "diffusiongemma"
TOOLS = ("guidellm", "lm_eval", "langchain", "grpcurl", "genai_perf")
TOOL_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost", "GUIDELLM__DEFAULT_RESULTS_DIR": "", "PYTHONUNBUFFERED": "1"}
# A line the server logs (at INFO) for every call that did not end OK: "request <id>: <CODE>: <message>".
SERVER_ERROR = re.compile(r"dgemma\.front: request \S+: ([A-Z_]+): (.*)$")


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run(cmd: list[str], timeout: float, cwd: Path | None = None, env: dict | None = None) -> dict:
    """Runs cmd in its own process group (guidellm starts workers), killed whole past `timeout`."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **TOOL_ENV, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc = None
    return {"rc": rc, "timed_out": rc is None, "seconds": round(time.perf_counter() - t, 2), "stdout": out,
            "stderr": err}


def error_of(res: dict, timeout: float) -> str:
    """The tool's own last words: its exception line if it raised one, else the tail of its output."""
    if res["timed_out"]:
        return f"timed out after {timeout:.0f} s (killed); last output:\n" + tail(res["stderr"] or res["stdout"], 8)
    text = (res["stderr"] or "") + "\n" + (res["stdout"] or "")
    raised = [ln for ln in text.splitlines() if re.match(r"^[\w.]*(Error|Exception|Exit)\b.*:", ln.strip())]
    return raised[-1].strip() if raised else tail(text, 8)


class Metrics:
    """The server's own counters (its /v1/metrics), to say per tool what it saw."""

    def __init__(self, base: str) -> None:
        self.base = base

    def read(self) -> dict[str, float]:
        with urllib.request.urlopen(self.base + "/v1/metrics", timeout=10) as r:
            body = r.read().decode()
        out = {}
        for ln in body.splitlines():
            if ln.startswith(("dgemma_front_requests_total{", "dgemma_front_ignored_fields_total{")):
                key, value = ln.rsplit(" ", 1)
                out[key] = float(value)
        return out

    @staticmethod
    def diff(before: dict, after: dict) -> dict:
        calls, ignored = {}, {}
        for key, value in after.items():
            n = int(value - before.get(key, 0.0))
            if not n:
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', key))
            if key.startswith("dgemma_front_requests_total"):
                calls[f"{labels.get('method')} {labels.get('code')}"] = n
            else:
                ignored[labels.get("field", "?")] = n
        return {"calls": calls, "ignored_fields": ignored}


def server_errors(log: Path, offset: int) -> dict[str, int]:
    """The error messages the server answered since `offset` in its log, with counts."""
    with open(log, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    seen: collections.Counter = collections.Counter()
    for ln in text.splitlines():
        m = SERVER_ERROR.search(ln)
        if m:
            seen[f"{m.group(1)}: {m.group(2)}"] += 1
    return dict(seen)


# --- guidellm -------------------------------------------------------------------------------------------------


def guidellm_tokenizer(work: Path) -> Path:
    """guidellm loads a transformers tokenizer: the checkpoint's tokenizer.json and a minimal config."""
    d = work / "tokenizer"
    d.mkdir(exist_ok=True)
    shutil.copy(TOKENIZER, d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": 8192}))
    return d


def _stat(metric: dict | None, *names: str) -> dict:
    s = (metric or {}).get("successful") or {}
    pct = s.get("percentiles") or {}
    out = {}
    for n in names:
        v = pct.get(n) if n.startswith("p") else s.get(n)
        out[n] = None if v is None else round(float(v), 3)
    return out


def guidellm_numbers(path: Path) -> dict:
    doc = json.loads(path.read_text())
    out = []
    for b in doc.get("benchmarks", []):
        m = b.get("metrics", {})
        errors: collections.Counter = collections.Counter()
        for r in (b.get("requests") or {}).get("errored") or []:
            info = r.get("info") or {}
            errors[str(info.get("error") or r.get("error") or r.get("output") or "?")[:500]] += 1
        out.append({
            "strategy": (b.get("scheduler_metrics") or {}).get("strategy_type"),
            "requests": m.get("request_totals"),
            "requests_per_second": _stat(m.get("requests_per_second"), "mean"),
            "request_latency_s": _stat(m.get("request_latency"), "mean", "median", "p95"),
            "ttft_ms": _stat(m.get("time_to_first_token_ms"), "mean", "median", "p95"),
            "itl_ms": _stat(m.get("inter_token_latency_ms"), "mean", "median", "p95"),
            "tpot_ms": _stat(m.get("time_per_output_token_ms"), "mean", "median"),
            "output_tokens_per_second": _stat(m.get("output_tokens_per_second"), "mean"),
            "output_tokens_per_request": _stat(m.get("output_token_count"), "median"),
            "prompt_tokens_per_request": _stat(m.get("prompt_token_count"), "median"),
            "stream_iterations_per_request": _stat(m.get("request_streaming_iterations_count"), "median"),
            "errors": dict(errors),
        })
    return {"guidellm_version": (doc.get("metadata") or {}).get("guidellm_version"), "benchmarks": out}


def run_guidellm(ctx: dict) -> dict:
    smoke, work = ctx["smoke"], ctx["work"]
    tok = guidellm_tokenizer(work)
    count, seconds = (2, 15) if smoke else (20, 20)
    profiles = [("synchronous", "kind=synchronous")] + ([] if smoke else [("concurrent", "kind=concurrent,streams=4")])
    result: dict = {"ok": True, "commands": [], "runs": {}}
    for name, profile in profiles:
        out = work / f"guidellm-{name}.json"
        cmd = [str(ctx["bin"] / "guidellm"), "run",
               "--backend", f"kind=openai_http,target={ctx['http']},model={MODEL},request_format=/v1/completions",
               "--profile", profile,
               "--constraint", f"kind=max_requests,count={count}",
               "--constraint", f"kind=max_duration,seconds={seconds}",
               "--tokenizer", f"kind=huggingface_auto,model={tok}",
               "--data", "kind=synthetic_text,prompt_tokens=32,output_tokens=32",
               "--output", f"kind=json,path={out}",
               "--disable-console-interactive"]
        result["commands"].append(" ".join(cmd))
        limit = ctx["timeout"]
        res = run(cmd, limit, cwd=work)
        entry: dict = {"rc": res["rc"], "seconds": res["seconds"]}
        if out.exists():
            entry.update(guidellm_numbers(out))
        runs_ok = res["rc"] == 0 and out.exists() and all(
            (b["requests"] or {}).get("successful", 0) > 0 and not (b["requests"] or {}).get("errored")
            for b in entry.get("benchmarks", [])) and entry.get("benchmarks")
        if not runs_ok:
            errs = [e for b in entry.get("benchmarks", []) for e in b["errors"]]
            entry["error"] = "; ".join(errs) if errs else error_of(res, limit)
        entry["ok"] = bool(runs_ok)
        result["ok"] = result["ok"] and entry["ok"]
        result["runs"][name] = entry
    return result


# --- lm-evaluation-harness ------------------------------------------------------------------------------------


def run_lm_eval(ctx: dict) -> dict:
    out = ctx["work"] / "lm_eval"
    limit = 2 if ctx["smoke"] else 10
    model_args = (f"base_url={ctx['http']}/v1/completions,model={MODEL},tokenized_requests=False,"
                  "tokenizer_backend=remote,num_concurrent=1,max_retries=1")
    cmd = [str(ctx["bin"] / "lm_eval"), "--model", "local-completions", "--model_args", model_args,
           "--tasks", "dgemma_pycomplete", "--include_path", str(PEERS), "--limit", str(limit),
           "--output_path", str(out), "--log_samples"]
    # cwd: the task's data_files path (pycomplete.jsonl) is relative to it.
    res = run(cmd, ctx["timeout"], cwd=PEERS)
    result: dict = {"ok": False, "command": " ".join(cmd), "rc": res["rc"], "seconds": res["seconds"]}
    files = sorted(glob.glob(str(out / "**" / "results_*.json"), recursive=True))
    if res["rc"] == 0 and files:
        doc = json.loads(Path(files[-1]).read_text())
        task = doc["results"]["dgemma_pycomplete"]
        result["results"] = {k: v for k, v in task.items() if k != "alias"}
        result["n_samples"] = (doc.get("n-samples") or {}).get("dgemma_pycomplete")
        result["lm_eval_version"] = doc.get("lm_eval_version")
        samples = sorted(glob.glob(str(out / "**" / "samples_dgemma_pycomplete_*.jsonl"), recursive=True))
        if samples:
            rows = [json.loads(ln) for ln in Path(samples[-1]).read_text().splitlines()[:3]]
            result["first_samples"] = [{"prompt": r["doc"]["prompt"], "target": r["target"],
                                        "response": (r.get("resps") or [[None]])[0][0],
                                        "filtered": (r.get("filtered_resps") or [None])[0]} for r in rows]
        result["ok"] = True
    else:
        said = re.findall(r"API request failed with error message: (.*?)\. Retrying", res["stderr"] or "")
        result["error"] = error_of(res, ctx["timeout"])
        if said:
            result["api_errors"] = sorted(set(said))
    return result


# --- LangChain ------------------------------------------------------------------------------------------------

LANGCHAIN = r"""
import json, sys, time
from langchain_openai import ChatOpenAI

out = {}
llm = ChatOpenAI(base_url=sys.argv[1], api_key="unused", model=sys.argv[2], max_tokens=16, max_retries=0, timeout=120)
question = "Write a Python function that adds two numbers."
try:
    t = time.perf_counter()
    r = llm.invoke(question)
    out["invoke"] = {"ok": True, "seconds": round(time.perf_counter() - t, 3), "text": r.content,
                     "usage": r.usage_metadata, "finish_reason": r.response_metadata.get("finish_reason")}
except Exception as e:
    out["invoke"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
try:
    t = time.perf_counter()
    chunks, first = [], None
    for c in llm.stream(question):
        if first is None and c.content:
            first = time.perf_counter() - t
        chunks.append(c.content)
    out["stream"] = {"ok": True, "seconds": round(time.perf_counter() - t, 3),
                     "first_content_s": None if first is None else round(first, 3),
                     "chunks": len(chunks), "text": "".join(chunks)}
except Exception as e:
    out["stream"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}

from pydantic import BaseModel


class Person(BaseModel):
    name: str
    age: int


def get_weather(city: str, days: int) -> str:
    '''The weather in a city for some days.'''
    return "sunny"


# the document's length is the schema's (max_tokens 16 would cap it below a tool call's arguments: a 400 saying so)
free = ChatOpenAI(base_url=sys.argv[1], api_key="unused", model=sys.argv[2], max_retries=0, timeout=120)
for key, method in (("structured_json_schema", "json_schema"), ("structured_function_calling", "function_calling")):
    try:  # LangChain's structured output: response_format json_schema, or a forced tool call, parsed by Pydantic
        t = time.perf_counter()
        p = free.with_structured_output(Person, method=method).invoke("Invent a person.")
        out[key] = {"ok": isinstance(p, Person), "seconds": round(time.perf_counter() - t, 3), "value": p.model_dump()}
    except Exception as e:
        out[key] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
try:
    t = time.perf_counter()
    r = free.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Paris for 2 days?")
    call = r.tool_calls[0]
    out["tool_call"] = {"ok": call["name"] == "get_weather" and set(call["args"]) == {"city", "days"},
                        "seconds": round(time.perf_counter() - t, 3), "call": {k: call[k] for k in ("name", "args")}}
except Exception as e:
    out["tool_call"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
print(json.dumps(out))
"""
LANGCHAIN_CHECKS = ("invoke", "stream", "structured_json_schema", "structured_function_calling", "tool_call")


def run_langchain(ctx: dict) -> dict:
    script = ctx["work"] / "langchain_chat.py"
    script.write_text(LANGCHAIN)
    cmd = [str(ctx["bin"] / "python"), str(script), ctx["http"] + "/v1", MODEL]
    res = run(cmd, ctx["timeout"])
    result: dict = {"ok": False, "command": " ".join(cmd), "rc": res["rc"], "seconds": res["seconds"]}
    try:
        doc = json.loads(res["stdout"].strip().splitlines()[-1])
    except (ValueError, IndexError):
        result["error"] = error_of(res, ctx["timeout"])
        return result
    result.update(doc)
    result["ok"] = res["rc"] == 0 and all(doc[k]["ok"] for k in LANGCHAIN_CHECKS)
    if not result["ok"]:
        result["error"] = "; ".join(f"{k}: {doc[k].get('error', 'wrong result')}" for k in LANGCHAIN_CHECKS
                                    if not doc[k]["ok"])
    return result


# --- grpcurl --------------------------------------------------------------------------------------------------

GRPC_REQUEST = {"text": "def ", "max_new_tokens": 8, "options": {"parameters": {"max_denoising_steps": 4}}}


def run_grpcurl(ctx: dict) -> dict:
    exe = str(ctx["bin"] / "grpcurl")
    target = f"127.0.0.1:{ctx['grpc_port']}"
    version = run([exe, "-version"], 60)
    listing = run([exe, "-plaintext", target, "list"], 60)
    call_cmd = [exe, "-plaintext", "-d", json.dumps(GRPC_REQUEST), target,
                "diffusiongemma.v1.DiffusionGemma/Generate"]
    call = run(call_cmd, ctx["timeout"])
    result: dict = {"commands": [" ".join([exe, "-plaintext", target, "list"]),
                                 " ".join(call_cmd[:3]) + f" '{json.dumps(GRPC_REQUEST)}' " + " ".join(call_cmd[4:])],
                    "version": (version["stdout"] + version["stderr"]).strip(),
                    "list": {"rc": listing["rc"], "services": listing["stdout"].split()},
                    "generate": {"rc": call["rc"], "seconds": call["seconds"]}}
    if listing["rc"] != 0:
        result["list"]["error"] = error_of(listing, 60)
    if call["rc"] == 0:
        try:
            doc = json.loads(call["stdout"])
            choice = doc["choices"][0]
            result["generate"].update({"text": choice.get("text"), "tokens": len(choice.get("token_ids", [])),
                                       "finish_reason": choice.get("finish_reason"), "stats": choice.get("stats"),
                                       "usage": doc.get("usage")})
        except (ValueError, KeyError, IndexError) as e:
            result["generate"]["error"] = f"unreadable response ({e}): {call['stdout'][:500]}"
    else:
        result["generate"]["error"] = error_of(call, ctx["timeout"])
    result["ok"] = (listing["rc"] == 0 and "diffusiongemma.v1.DiffusionGemma" in result["list"]["services"]
                    and call["rc"] == 0 and "error" not in result["generate"])
    return result


# --- genai-perf -----------------------------------------------------------------------------------------------


def run_genai_perf(ctx: dict) -> dict:
    """NVIDIA's genai-perf drives perf_analyzer, which PyPI's perf-analyzer package does not ship (a placeholder):
    `make peers` takes it from tritonclient 2.50.0's wheel (docs/benchmarks.md). genai-perf reads perf_analyzer's
    profile export and writes its own JSON, whose metrics are reported here."""
    def find(name: str) -> str | None:  # the peers venv's first, else PATH's
        return str(ctx["bin"] / name) if (ctx["bin"] / name).exists() else shutil.which(name)

    gp, pa = find("genai-perf"), find("perf_analyzer")
    if not gp or not pa:
        missing = [n for n, p in (("genai-perf", gp), ("perf_analyzer", pa)) if not p]
        return {"ok": False, "skipped": True,
                "error": f"not installed: {', '.join(missing)} (`make peers` installs both)"}
    out = ctx["work"] / "genai_perf"
    count = 2 if ctx["smoke"] else 20
    cmd = [gp, "profile", "-m", MODEL, "--endpoint-type", "completions", "--url", ctx["http"].split("//", 1)[1],
           "--streaming", "--synthetic-input-tokens-mean", "32", "--output-tokens-mean", "32",
           "--tokenizer", str(guidellm_tokenizer(ctx["work"])), "--concurrency", "1",
           "--request-count", str(count), "--warmup-request-count", "0", "--artifact-dir", str(out)]
    # perf_analyzer (tritonclient 2.50.0's) links libcudart.so.12 (nvidia-cuda-runtime-cu12) even on the CPU.
    site = ctx["bin"].parent / "lib" / "python3*" / "site-packages"
    cudart = glob.glob(str(site / "nvidia" / "cuda_runtime" / "lib"))
    ld = ":".join(cudart + [os.environ.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    res = run(cmd, ctx["timeout"], cwd=ctx["work"],
              env={"PATH": f"{Path(pa).parent}:{os.environ.get('PATH', '')}", "LD_LIBRARY_PATH": ld})
    result: dict = {"ok": False, "command": " ".join(cmd), "rc": res["rc"], "seconds": res["seconds"]}
    files = sorted(glob.glob(str(out / "**" / "*genai_perf.json"), recursive=True))
    if res["rc"] == 0 and files:
        doc = json.loads(Path(files[-1]).read_text())
        result["results"] = {k: {s: (round(x, 3) if isinstance(x, float) else x) for s, x in v.items()
                                 if s in ("unit", "avg", "p50", "p99", "min", "max") and x is not None}
                             for k, v in doc.items() if isinstance(v, dict) and "unit" in v}
        result["ok"] = True
    else:
        result["error"] = error_of(res, ctx["timeout"])
    return result


RUNNERS = {"guidellm": run_guidellm, "lm_eval": run_lm_eval, "langchain": run_langchain, "grpcurl": run_grpcurl,
           "genai_perf": run_genai_perf}


def machine() -> dict:
    lscpu = ""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        pass
    model = re.search(r"Model name:\s*(.*)", lscpu)
    return {"machine": platform.machine(), "cpu": model.group(1).strip() if model else platform.processor(),
            "cpus": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()]}


def wait_healthy(base: str, seconds: float = 120) -> None:
    end = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > end:
            raise RuntimeError(f"{base}/health not 200 within {seconds:.0f} s")
        time.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny runs (2 requests, 2 lm-eval samples, no concurrent)")
    ap.add_argument("--only", action="append", choices=TOOLS, help="run only this tool (repeatable)")
    ap.add_argument("--threads", type=int, default=1, help="the engine's torch threads")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per tool command (default 300; smoke 180)")
    ap.add_argument("--peers-venv", type=Path, default=ROOT / ".venv-peers")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (the tools' own output files)")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `with Serve` stops the server
    venv_bin = a.peers_venv / "bin"
    if not (venv_bin / "python").exists():
        print(json.dumps({"error": f"no peers venv at {a.peers_venv}: run `make peers`"}))
        return 2
    tools = a.only or [t for t in TOOLS]
    work = Path(tempfile.mkdtemp(prefix="dgemma-peers-"))
    doc: dict = {"date": datetime.date.today().isoformat(), **machine(), "engine_threads": a.threads,
                 "smoke": a.smoke, "work": str(work) if a.keep else None, "tools": {}}
    t0 = time.perf_counter()
    try:
        with Serve(a.threads, env={"NIM_GRPC_REFLECTION": "1", "NIM_LOG_LEVEL": "INFO"}) as srv:
            http = f"http://127.0.0.1:{srv.http_port}"
            wait_healthy(http)
            metrics = Metrics(http)
            ctx = {"smoke": a.smoke, "work": work, "bin": venv_bin, "http": http, "grpc_port": srv.port,
                   "timeout": a.timeout or (180 if a.smoke else 300)}
            for tool in tools:
                before, offset = metrics.read(), srv.log.stat().st_size
                t = time.perf_counter()
                try:
                    result = RUNNERS[tool](ctx)
                except Exception as e:  # noqa: BLE001 - the report says what broke, the next tool still runs
                    result = {"ok": False, "error": f"peers.py: {type(e).__name__}: {e}"}
                result["wall_s"] = round(time.perf_counter() - t, 2)
                result["server"] = {**Metrics.diff(before, metrics.read()),
                                    "errors_answered": server_errors(srv.log, offset)}
                doc["tools"][tool] = result
                print(f"peers: {tool}: {'ok' if result['ok'] else 'FAILED'} ({result['wall_s']} s)", file=sys.stderr)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    doc["wall_s"] = round(time.perf_counter() - t0, 2)
    doc["ok"] = {t: r["ok"] for t, r in doc["tools"].items()}
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
