"""The `dgemma` command."""

from __future__ import annotations

import argparse
import json
import logging
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
    p.add_argument("--max-new-tokens", type=int, default=DEFAULTS["max_new_tokens"])
    p.add_argument("--max-denoising-steps", type=int, default=DEFAULTS["max_denoising_steps"])
    p.add_argument("--entropy-bound", type=float, default=DEFAULTS["entropy_bound"])
    p.add_argument("--t-min", type=float, default=DEFAULTS["t_min"])
    p.add_argument("--t-max", type=float, default=DEFAULTS["t_max"])
    p.add_argument("--stability-threshold", type=int, default=DEFAULTS["stability_threshold"])
    p.add_argument("--confidence-threshold", type=float, default=DEFAULTS["confidence_threshold"])
    p.add_argument("--seed", type=int, default=0)


def _params(a: argparse.Namespace) -> GenerationParams:
    return GenerationParams(
        max_new_tokens=a.max_new_tokens,
        max_denoising_steps=a.max_denoising_steps,
        entropy_bound=a.entropy_bound,
        t_min=a.t_min,
        t_max=a.t_max,
        stability_threshold=a.stability_threshold,
        confidence_threshold=a.confidence_threshold,
    )


def cmd_generate(a: argparse.Namespace) -> int:
    from service.engine.api import CanvasEvent, DraftEvent, FinalEvent, Request
    from service.engine.registry import create_engine

    if (a.prompt is None) == (a.prompt_ids is None):
        raise InvalidArgument("prompt", "give exactly one of --prompt or --prompt-ids")
    params = _params(a).validate()
    engine = create_engine(a.backend, checkpoint_dir=a.checkpoint, device=a.device, dtype=a.dtype, threads=a.threads)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if getattr(a, "prompt_flag", None) is not None:
        if a.prompt is not None:
            parser.error("give the prompt once, positionally or with --prompt")
        a.prompt = a.prompt_flag
    try:
        return a.func(a)
    except DGemmaError as e:
        print(f"dgemma: error: {e.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
