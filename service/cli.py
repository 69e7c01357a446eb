"""The `dgemma` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from service.errors import DGemmaError, InvalidArgument
from service.sampler.params import DEFAULTS, GenerationParams

DEFAULT_CHECKPOINT = Path(__file__).parent / "assets" / "tiny-diffusiongemma"


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated integers, e.g. 2,105,10") from None


def _add_generation_flags(p: argparse.ArgumentParser) -> None:
    # Unset flags take the checkpoint's generation_config.json, else the reference's defaults.
    for name, kind in (("max_new_tokens", int), ("max_denoising_steps", int), ("entropy_bound", float),
                       ("t_min", float), ("t_max", float), ("stability_threshold", int),
                       ("confidence_threshold", float)):
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=f"(reference: {DEFAULTS[name]})")
    p.add_argument("--sampler", choices=["reference", "fast"], default=None)
    p.add_argument("--seed", type=int, default=0)


def _params(a: argparse.Namespace, defaults: GenerationParams) -> GenerationParams:
    given = {f: getattr(a, f) for f in (*DEFAULTS, "sampler") if getattr(a, f, None) is not None}
    return dataclasses.replace(defaults, **given)


def cmd_generate(a: argparse.Namespace) -> int:
    from service.engine.api import CanvasEvent, DraftEvent, FinalEvent, Request
    from service.engine.registry import create_engine

    if (a.prompt is None) == (a.prompt_ids is None):
        raise InvalidArgument("prompt", "give exactly one of --prompt or --prompt-ids")
    engine = create_engine(a.backend, checkpoint_dir=a.checkpoint, device=a.device, dtype=a.dtype, threads=a.threads)
    params = _params(a, engine.default_params).validate()
    tok = engine.tokenizer
    if a.prompt is not None:
        if tok is None:
            raise InvalidArgument("prompt", "this checkpoint has no tokenizer.json; use --prompt-ids")
        prompt_ids = tok.encode(a.prompt)
    else:
        prompt_ids = a.prompt_ids
    request = Request(prompt_ids=prompt_ids, params=params, seed=a.seed, return_drafts=a.visual)
    final = None
    for ev in engine.generate(request):
        if isinstance(ev, DraftEvent) and a.visual and tok is not None:
            text = tok.decode(ev.tokens).replace("\n", "⏎")
            sys.stderr.write(f"\r\x1b[2K[canvas {ev.canvas_index} step {ev.step:>3}] {text[:200]}")
            sys.stderr.flush()
        elif isinstance(ev, CanvasEvent) and a.visual:
            sys.stderr.write("\n")
        elif isinstance(ev, FinalEvent):
            final = ev
    assert final is not None
    text = tok.decode(final.token_ids) if tok is not None else None
    if a.json:
        out = {"token_ids": final.token_ids, "finish_reason": final.finish_reason, "stats": final.stats.as_dict()}
        if text is not None:
            out["text"] = text
        print(json.dumps(out))
    else:
        print(text if text is not None else " ".join(map(str, final.token_ids)))
    return 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidArgument(name, f"must be an integer, got {raw!r}") from None


def cmd_serve(a: argparse.Namespace) -> int:
    """Serve the model repository on Triton (its own KServe v2 gRPC port) until SIGTERM/SIGINT."""
    import signal
    import tempfile
    import threading

    from service.triton.launcher import TritonPorts, TritonServer, free_port
    from service.triton.repository import MODEL_NAME, RepositorySettings, build_repository

    if not a.triton_only:
        raise InvalidArgument("triton_only", "the public gRPC front is not built yet; run with --triton-only")
    ckpt = Path(a.checkpoint)
    if not (ckpt / "config.json").is_file():
        raise InvalidArgument("checkpoint", f"no checkpoint at {ckpt}")
    cache = Path(os.environ.get("NIM_CACHE_PATH") or Path(tempfile.gettempdir()) / "dgemma")
    repo = build_repository(
        cache / "model_repository",
        RepositorySettings(checkpoint_dir=str(ckpt.resolve()), device=a.device, dtype=a.dtype or "",
                           instance_kind="KIND_GPU" if a.device.startswith("cuda") else "KIND_CPU",
                           threads=a.threads or 0),
    )
    ports = TritonPorts(a.grpc_port, a.http_port or free_port(), a.metrics_port)
    server = TritonServer(repo, ports=ports, cache_dir=cache, trace_url=os.environ.get("NIM_TRITON_TRACE_URL"))
    server.start(timeout=a.startup_timeout, wait_model=MODEL_NAME)
    print(f"dgemma: serving {MODEL_NAME} from {ckpt} on Triton gRPC 127.0.0.1:{ports.grpc} "
          f"(metrics :{ports.metrics}); Ctrl-C to stop", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(1.0):
        if not server.alive():
            print("dgemma: error: tritonserver exited", file=sys.stderr)
            return 1
    rc = server.stop()
    return 0 if rc in (0, None) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgemma", description="DiffusionGemma inference microservice")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate in process from a checkpoint")
    g.add_argument("prompt", nargs="?", default=None, help="prompt text (needs a tokenizer)")
    g.add_argument("--prompt", dest="prompt_flag", default=None, help="prompt text (same as the positional)")
    g.add_argument("--prompt-ids", type=_ids, default=None, help="comma-separated prompt token ids")
    g.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    g.add_argument("--backend", default="torch")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("--visual", action="store_true", help="show the canvas converging on stderr")
    _add_generation_flags(g)
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="serve the model (Triton Inference Server)")
    s.add_argument("--triton-only", action="store_true", help="serve on Triton's own gRPC port (no front yet)")
    s.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    s.add_argument("--device", default="cpu")
    s.add_argument("--dtype", default=None)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--grpc-port", type=int, default=None, help="Triton gRPC port (env NIM_TRITON_GRPC_PORT, 8001)")
    s.add_argument("--http-port", type=int, default=None)
    s.add_argument("--metrics-port", type=int, default=None, help="env NIM_TRITON_METRICS_PORT, 8002")
    s.add_argument("--startup-timeout", type=float, default=300.0)
    s.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    level = os.environ.get("NIM_LOG_LEVEL", a.log_level).upper()
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if getattr(a, "prompt_flag", None) is not None:
        if a.prompt is not None:
            parser.error("give the prompt once, positionally or with --prompt")
        a.prompt = a.prompt_flag
    try:
        if a.command == "serve":
            a.grpc_port = a.grpc_port or _env_int("NIM_TRITON_GRPC_PORT", 8001)
            a.metrics_port = a.metrics_port or _env_int("NIM_TRITON_METRICS_PORT", 8002)
        return a.func(a)
    except DGemmaError as e:
        print(f"dgemma: error: {e.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
