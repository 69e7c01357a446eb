"""The `dgemma` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from service import DEFAULT_CHECKPOINT
from service.api.diffusiongemma.v1 import diffusiongemma_pb2 as pb
from service.client import DEFAULT_TARGET, Client, ClientError
from service.errors import DGemmaError, InvalidArgument
from service.sampler.params import DEFAULTS, GenerationParams, request_params
from service.telemetry.logs import configure_logging, jsonl_from_env


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated integers, e.g. 2,105,10") from None


def _add_generation_flags(p: argparse.ArgumentParser, max_new_tokens: bool = True) -> None:
    # Unset flags take the checkpoint's generation_config.json, else the reference's defaults.
    for name, kind in (("max_new_tokens", int), ("max_denoising_steps", int), ("entropy_bound", float),
                       ("t_min", float), ("t_max", float), ("stability_threshold", int),
                       ("confidence_threshold", float), ("temperature", float), ("top_k", int)):
        if name == "max_new_tokens" and not max_new_tokens:
            continue
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=f"(reference: {DEFAULTS[name]})")
    p.add_argument("--sampler", choices=["reference", "fast"], default=None)
    p.add_argument("--seed", type=int, default=0)


def _params(a: argparse.Namespace, defaults: GenerationParams) -> GenerationParams:
    given = {f: getattr(a, f) for f in (*DEFAULTS, "sampler") if getattr(a, f, None) is not None}
    return request_params(defaults, given)


def cmd_generate(a: argparse.Namespace) -> int:
    from service.engine.api import CanvasEvent, DraftEvent, FinalEvent, Request
    from service.engine.registry import create_engine

    if (a.prompt is None) == (a.prompt_ids is None):
        raise InvalidArgument("prompt", "give exactly one of --prompt or --prompt-ids")
    if a.server or os.environ.get("DGEMMA_SERVER"):
        return _generate_remote(a)
    engine = create_engine(a.backend, checkpoint_dir=a.checkpoint, device=a.device, dtype=a.dtype, threads=a.threads,
                           tile_rows=a.tile_rows)
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
            _show_draft(tok.decode(ev.tokens), ev.canvas_index, ev.step)
        elif isinstance(ev, CanvasEvent) and a.visual:
            _end_canvas()
        elif isinstance(ev, FinalEvent):
            final = ev
    assert final is not None
    text = tok.decode(final.token_ids) if tok is not None else None
    _print_generation(a, text, final.token_ids, final.finish_reason, final.stats.as_dict())
    return 0


def _show_draft(text: str, canvas_index: int, step: int, variation: int | None = None) -> None:
    """The live --visual line on stderr: the canvas after one denoising step, overwritten by the next."""
    label = "" if variation is None else f"var {variation} "
    sys.stderr.write(f"\r\x1b[2K[{label}canvas {canvas_index} step {step:>3}] {text.replace(chr(10), '⏎')[:200]}")
    sys.stderr.flush()


def _end_canvas() -> None:
    sys.stderr.write("\n")


def _print_generation(a: argparse.Namespace, text: str | None, token_ids: list[int], finish_reason: str,
                      stats: dict) -> None:
    if a.json:
        out = {"token_ids": token_ids, "finish_reason": finish_reason, "stats": stats}
        if text is not None:
            out["text"] = text
        print(json.dumps(out))
    else:
        print(text if text is not None else " ".join(map(str, token_ids)))


# ---------------------------------------------------------------------------------------------------
# Subcommands that talk to a running server (service.client)

def _add_client_flags(p: argparse.ArgumentParser, generating: bool = True, json_flag: bool = True,
                      server_default: str = "") -> None:
    p.add_argument("--server", default=None, metavar="HOST:PORT",
                   help=f"the server (env DGEMMA_SERVER{server_default})")
    p.add_argument("--api-key", default=None, help="bearer token (env DGEMMA_API_KEY)")
    p.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    p.add_argument("--tls-ca", default=None, metavar="FILE", help="TLS with this CA bundle (PEM)")
    p.add_argument("--tls-cert", default=None, metavar="FILE", help="client certificate for mutual TLS (PEM)")
    p.add_argument("--tls-key", default=None, metavar="FILE", help="the client certificate's key (PEM)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="deadline of the call")
    if generating:
        p.add_argument("--num-variations", type=int, default=None, help="independent outputs, 1 to 16")
    if json_flag:
        p.add_argument("--json", action="store_true", help="print the response as JSON")


def _read_file(path: str | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise InvalidArgument(flag, f"cannot read {path}: {e.strerror}") from None


def _client(a: argparse.Namespace) -> Client:
    a.server = a.server or os.environ.get("DGEMMA_SERVER") or DEFAULT_TARGET
    if (a.tls_cert is None) != (a.tls_key is None):
        raise InvalidArgument("--tls-cert", "give --tls-cert and --tls-key together")
    return Client(a.server, api_key=a.api_key or os.environ.get("DGEMMA_API_KEY") or None,
                  root_certificates=_read_file(a.tls_ca, "--tls-ca"),
                  client_certificate=_read_file(a.tls_cert, "--tls-cert"),
                  client_key=_read_file(a.tls_key, "--tls-key"), tls=a.tls, timeout=a.timeout)


def _generation_kwargs(a: argparse.Namespace) -> dict:
    """Diffusion flags, seed and variations as client keywords (None: the server's default)."""
    names = [n for n in DEFAULTS if n != "max_new_tokens"] + ["sampler", "seed", "num_variations"]
    return {n: getattr(a, n) for n in names}


def _print_json(message: Message) -> None:
    print(json.dumps(MessageToDict(message, preserving_proto_field_name=True)))


def _print_choices(a: argparse.Namespace, response: Message) -> None:
    """--json: the whole response; else each variation's text (headed when there are several)."""
    if a.json:
        _print_json(response)
        return
    for c in response.choices:
        if len(response.choices) > 1:
            print(f"--- variation {c.index} ---")
        print(c.text)


def _finish_reason(value: int) -> str:
    return pb.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


def _generate_remote(a: argparse.Namespace) -> int:
    kw = dict(_generation_kwargs(a), max_new_tokens=a.max_new_tokens)
    if a.prompt is not None:
        kw["text"] = a.prompt
    else:
        kw["token_ids"] = a.prompt_ids
    with _client(a) as client:
        response = _stream_visual(client, kw, several=(a.num_variations or 1) > 1) if a.visual \
            else client.generate(**kw)
    for c in response.choices:
        if len(response.choices) > 1 and not a.json:
            print(f"--- variation {c.index} ---")
        stats = _choice_stats(c, response.usage, len(response.choices))
        _print_generation(a, c.text, list(c.token_ids), _finish_reason(c.finish_reason), stats)
    return 0


def _stream_visual(client: Client, kw: dict, several: bool) -> pb.GenerateResponse:
    """GenerateStream with drafts, shown live on stderr; returns the final response."""
    final = None
    for ev in client.generate_stream(return_drafts=True, **kw):  # read to the end: no cancel after the final
        kind = ev.WhichOneof("event")
        if kind == "draft":
            d = ev.draft
            _show_draft(d.text, d.canvas_index, d.step, d.variation if several else None)
        elif kind == "canvas":
            _end_canvas()
        elif kind == "final":
            final = ev.final
    if final is None:
        raise ClientError(grpc.StatusCode.UNKNOWN, "the stream ended without a final event")
    return final


def _choice_stats(c: pb.Choice, usage: pb.Usage, n_choices: int) -> dict:
    """The in-process --json stats shape from a Choice; usage counts tokens over all variations."""
    s = c.stats
    generated = usage.completion_tokens if n_choices == 1 else round(s.tokens_per_forward * s.decoder_passes)
    return {"prompt_tokens": usage.prompt_tokens, "generated_tokens": generated, "decoder_passes": s.decoder_passes,
            "steps_per_canvas": list(s.steps_per_canvas), "tokens_per_forward": s.tokens_per_forward,
            "shared_decoder_passes": s.shared_decoder_passes}


def cmd_infill(a: argparse.Namespace) -> int:
    with _client(a) as client:
        response = client.infill(a.prefix, a.suffix, a.gap_tokens, **_generation_kwargs(a))
    _print_choices(a, response)
    return 0


def cmd_template(a: argparse.Namespace) -> int:
    if a.file == "-":
        skeleton = sys.stdin.read()
    else:
        skeleton = _read_file(a.file, "FILE").decode()
    with _client(a) as client:
        response = client.template(skeleton, instruction=a.instruction, **_generation_kwargs(a))
    _print_choices(a, response)
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    with _client(a) as client:
        response = client.list_models()
    if a.json:
        _print_json(response)
        return 0
    for m in response.models:
        print(f"{m.id}\tcanvas_length={m.canvas_length}\tvocab_size={m.vocab_size}\tprofile={m.profile}")
    return 0


def cmd_tokenize(a: argparse.Namespace) -> int:
    with _client(a) as client:
        response = client.tokenize(a.text)
    if a.json:
        _print_json(response)
    else:
        print(",".join(map(str, response.token_ids)))
    return 0


def cmd_health(a: argparse.Namespace) -> int:
    """grpc.health.v1 Check: prints the status; exit 0 only for SERVING (the image's HEALTHCHECK, exec probes)."""
    a.timeout = a.timeout or 5.0
    with _client(a) as client:
        status = client.health(a.service)
    print(status)
    return 0 if status == "SERVING" else 1


def _add_client_commands(sub: argparse._SubParsersAction) -> None:
    server = ", else " + DEFAULT_TARGET
    p = sub.add_parser("infill", help="fill a gap between a prefix and a suffix (on a server)")
    p.add_argument("--prefix", default="", help="text before the gap")
    p.add_argument("--suffix", default="", help="text after the gap")
    p.add_argument("--gap-tokens", type=int, required=True, help="length of the gap in tokens")
    _add_generation_flags(p, max_new_tokens=False)
    _add_client_flags(p, server_default=server)
    p.set_defaults(func=cmd_infill)

    p = sub.add_parser("template", help="fill the typed holes of a skeleton (on a server)")
    p.add_argument("file", metavar="FILE", help="skeleton with {{name:type:length}} holes; - reads stdin")
    p.add_argument("--instruction", default="", help="given to the model as a user turn before the skeleton")
    _add_generation_flags(p, max_new_tokens=False)
    _add_client_flags(p, server_default=server)
    p.set_defaults(func=cmd_template)

    p = sub.add_parser("models", help="list the models a server hosts")
    _add_client_flags(p, generating=False, server_default=server)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("tokenize", help="token ids of a text, as the server computes them")
    p.add_argument("text", metavar="TEXT")
    _add_client_flags(p, generating=False, server_default=server)
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("health", help="check a server's health (exit 0 when SERVING, 1 otherwise, 2 unreachable)")
    p.add_argument("--service", default="", help='health service name (default "": the whole server)')
    _add_client_flags(p, generating=False, json_flag=False, server_default=server)
    p.set_defaults(func=cmd_health)


def _client_error_line(e: ClientError, target: str | None) -> str:
    if e.code.name == "UNAVAILABLE" and "connect" in e.message.lower():
        reason = e.message.rsplit(": ", 1)[-1].strip()
        return f"UNAVAILABLE: cannot connect to the server at {target} ({reason})"
    return f"{e.code.name}: {' '.join(e.message.split())}"


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidArgument(name, f"must be an integer, got {raw!r}") from None


def cmd_serve(a: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT: Triton plus the public gRPC and HTTP front, or Triton alone (--triton-only)."""
    from service.serve.config import serve_options

    opts = serve_options(os.environ, checkpoint=a.checkpoint, profile=a.profile, port=a.port,
                         metrics_port=None if a.triton_only else a.metrics_port,
                         http_port=None if a.triton_only else a.http_port, host=a.host, threads=a.threads,
                         reflection=a.reflection)
    if a.triton_only:
        return _serve_triton_only(a, opts)
    from service.telemetry.tracing import setup_tracing
    from service.serve.supervisor import serve

    setup_tracing("dgemma-front")
    return serve(opts)


def cmd_list_profiles(a: argparse.Namespace) -> int:
    """The profiles, NIM `list-model-profiles` style: what this machine can build and run."""
    from service.serve.profiles import PROFILES, can_build, can_run, probe_machine

    machine = probe_machine()
    rows = []
    for p in PROFILES:
        (b, b_why), (r, r_why) = can_build(p, machine), can_run(p, machine)
        rows.append({"id": p.id, "name": p.name, "precision": p.precision, "target": p.target,
                     "buildable": b, "buildable_reason": b_why, "runnable": r, "runnable_reason": r_why})
    if a.json:
        print(json.dumps({"machine": machine.describe, "profiles": rows}, indent=2))
        return 0
    print(f"MODEL PROFILES on this machine ({machine.describe})")
    for row in rows:
        print(f"  {row['id']} ({row['name']})  precision={row['precision']} target={row['target']}  "
              f"build: {'yes' if row['buildable'] else 'no'}  run: {'yes' if row['runnable'] else 'no'}"
              f"{'' if row['runnable'] else ' (' + row['runnable_reason'] + ')'}")
    return 0


def _serve_triton_only(a: argparse.Namespace, opts) -> int:
    """Triton alone on its own KServe v2 gRPC port (NIM_TRITON_GRPC_PORT, 8001)."""
    import signal
    import threading

    from service.triton.launcher import TritonPorts, TritonServer, free_port
    from service.triton.repository import build_repository

    repo = build_repository(opts.cache_dir / "model_repository", opts.repository)
    ports = TritonPorts(a.grpc_port or _env_int("NIM_TRITON_GRPC_PORT", 8001), a.http_port or free_port(),
                        a.metrics_port or _env_int("NIM_TRITON_METRICS_PORT", 8002))
    server = TritonServer(repo, ports=ports, cache_dir=opts.cache_dir, trace_url=os.environ.get("NIM_TRITON_TRACE_URL"),
                          log_file=opts.triton_log, log_max_bytes=opts.triton_log_max_bytes,
                          cpu_only=opts.repository.device == "cpu")
    server.start(timeout=opts.startup_timeout_s, wait_model=opts.repository.model_name)
    print(f"dgemma: serving {opts.repository.model_name} from {opts.front.checkpoint} on Triton gRPC "
          f"127.0.0.1:{ports.grpc} (metrics :{ports.metrics}); Ctrl-C to stop", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(1.0):
        if not server.alive():
            print("dgemma: error: tritonserver exited", file=sys.stderr)
            server.stop(0)  # its stubs, orphaned now
            return 1
    rc = server.stop()
    return 0 if rc in (0, None) else 1


def cmd_build(a: argparse.Namespace) -> int:
    """Build a profile from a checkpoint (calibrate, quantize, export, verify, manifest), or re-verify a build."""
    # The one link from service/ to engine_build, imported only here (it pulls ModelOpt and transformers).
    from engine_build.build import BuildOptions, build, reverify
    from engine_build.calibration import CalibrationSettings

    if a.verify is not None:
        if a.profile or a.output:
            raise InvalidArgument("--verify", "re-verifies an existing build; give no --profile or --output")
        result = reverify(a.verify, a.checkpoint, a.min_agreement, a.verify_prompts, a.verify_steps, a.threads,
                          a.device)
        print(json.dumps({"build": str(a.verify), "verification": result}))
        return 0
    if not a.profile:
        raise InvalidArgument("--profile", "give the profile to build (dgemma list-profiles), or --verify DIR")
    if a.output is None:
        raise InvalidArgument("--output", "give the build directory to write")
    opts = BuildOptions(a.checkpoint, a.profile, a.output, a.calibration, a.fp8_scaling, a.min_agreement,
                        CalibrationSettings(steps=a.calibration_steps), a.verify_prompts, a.verify_steps, a.threads,
                        a.if_missing, a.device)
    manifest = build(opts)
    print(json.dumps({"build": str(a.output), "profile": manifest["profile"], "calibration": manifest["calibration"],
                      "verification": manifest["verification"], "created": manifest.get("created")}))
    return 0


def _add_build_command(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("build", help="build a serving profile from a checkpoint (docs/build.md), or --verify one")
    b.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                   help="source checkpoint directory (default: the embedded tiny model)")
    b.add_argument("--profile", default=None, help="profile name or id (dgemma list-profiles)")
    b.add_argument("--output", type=Path, default=None, help="build directory to create (new or empty)")
    b.add_argument("--if-missing", action="store_true",
                   help="when --output already holds this build (same profile and source), check its files and "
                        "exit 0 without building (for Jobs that may run again)")
    b.add_argument("--verify", type=Path, default=None, metavar="DIR",
                   help="re-verify the build in DIR against --checkpoint (its source) and record the result")
    b.add_argument("--calibration", type=Path, default=None, metavar="FILE",
                   help="calibration prompts: one per line, or JSON lines {\"prompt\": ...} in a .jsonl file "
                        "(default: the built-in set)")
    b.add_argument("--calibration-steps", type=int, default=8, help="denoising steps per calibration canvas")
    b.add_argument("--fp8-scaling", choices=["per-tensor", "per-channel"], default="per-tensor",
                   help="FP8 weight scales (activations are per-tensor either way)")
    b.add_argument("--min-agreement", type=float, default=None,
                   help="minimum token agreement to pass (default: 0.95 for fp8/bf16, 0.90 for nvfp4, 1.0 for fp32)")
    b.add_argument("--verify-prompts", type=int, default=None, help="use the first N held-out prompts (default: all)")
    b.add_argument("--verify-steps", type=int, default=8, help="denoising steps per canvas when verifying")
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; 1 is fastest for the "
                                                              "tiny model on a busy CPU)")
    b.add_argument("--device", default="auto", help="where calibration and verification run: auto (a GPU in "
                   "bfloat16 when there is one, UNVERIFIED; else the CPU), cpu or cuda (docs/build.md)")
    b.set_defaults(func=cmd_build)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgemma", description="DiffusionGemma inference microservice")
    parser.add_argument("--log-level", default=None,
                        help="DEBUG, INFO, WARNING or ERROR (env NIM_LOG_LEVEL; default INFO for serve, else WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate in process from a checkpoint, or on a server (--server)")
    g.add_argument("prompt", nargs="?", default=None, help="prompt text (needs a tokenizer)")
    g.add_argument("--prompt", dest="prompt_flag", default=None, help="prompt text (same as the positional)")
    g.add_argument("--prompt-ids", type=_ids, default=None, help="comma-separated prompt token ids")
    g.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    g.add_argument("--backend", default="torch")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--tile-rows", type=int, default=None,
                   help="positions per vocabulary tile of the sampler (default: one canvas, smaller on a small GPU)")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("--visual", action="store_true", help="show the canvas converging on stderr")
    _add_generation_flags(g)
    _add_client_flags(g, json_flag=False, server_default="; without it, generate in process")
    g.set_defaults(func=cmd_generate)
    _add_client_commands(sub)

    lp = sub.add_parser("list-profiles", help="the model profiles and whether this machine can build and run each")
    lp.add_argument("--json", action="store_true", help="print one JSON object")
    lp.set_defaults(func=cmd_list_profiles)

    s = sub.add_parser("serve", help="serve the model: Triton plus the public gRPC front (docs/operations.md)")
    s.add_argument("--checkpoint", type=Path, default=None,
                   help="model directory (env NIM_MODEL_PATH; default: the embedded tiny model)")
    s.add_argument("--profile", default=None, help="profile name or id (env NIM_MODEL_PROFILE; default: the build's, "
                                                   "else torch-fp32-cpu on a CPU, torch-bf16-any on a GPU)")
    s.add_argument("--host", default=None, help="listen address (env NIM_SERVER_HOST, 0.0.0.0)")
    s.add_argument("--port", type=int, default=None, help="public gRPC port (env NIM_SERVER_PORT, 8000)")
    s.add_argument("--metrics-port", type=int, default=None,
                   help="Prometheus /metrics port (env NIM_METRICS_PORT, 8002); with --triton-only, Triton's "
                        "(env NIM_TRITON_METRICS_PORT, 8002)")
    s.add_argument("--reflection", action=argparse.BooleanOptionalAction, default=None,
                   help="gRPC server reflection (env NIM_GRPC_REFLECTION; default off)")
    s.add_argument("--threads", type=int, default=None, help="torch threads of the engine")
    s.add_argument("--triton-only", action="store_true", help="serve only Triton's KServe v2 gRPC, no front")
    s.add_argument("--grpc-port", type=int, default=None,
                   help="with --triton-only: Triton's gRPC port (env NIM_TRITON_GRPC_PORT, 8001)")
    s.add_argument("--http-port", type=int, default=None,
                   help="OpenAI-compatible HTTP port (env NIM_HTTP_PORT, 8080); with --triton-only, Triton's HTTP port")
    s.set_defaults(func=cmd_serve)
    _add_build_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    default_level = "INFO" if a.command == "serve" else "WARNING"
    level = (a.log_level or os.environ.get("NIM_LOG_LEVEL") or default_level).upper()
    configure_logging(level, jsonl_from_env())  # JSON lines when NIM_JSONL_LOGGING is set
    if getattr(a, "prompt_flag", None) is not None:
        if a.prompt is not None:
            parser.error("give the prompt once, positionally or with --prompt")
        a.prompt = a.prompt_flag
    try:
        return a.func(a)
    except DGemmaError as e:
        print(f"dgemma: error: {e.message}", file=sys.stderr)
        return 2
    except ClientError as e:
        print(f"dgemma: error: {_client_error_line(e, getattr(a, 'server', None))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
