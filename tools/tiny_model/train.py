"""Train the embedded tiny DiffusionGemma: `python -m tools.tiny_model.train`.

Resumable: state is saved to --workdir every --save-every steps and picked up on the next start.
Runs on the CPU, or unchanged on a CUDA GPU (--device cuda). Ends by exporting the checkpoint
(Hugging Face layout, float32 weights, under 16 MB) to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import signal
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from service.model.config import parse_config
from service.model.network import DiffusionGemma
from service.sampler.params import DIFFUSION_PARAMS
from tools.tiny_model.corpus import read_texts
from tools.tiny_model.objective import loss_step
from tools.tiny_model.tokenizer import id_stream, train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "service" / "assets" / "tiny-diffusiongemma"
DEFAULT_WORK = ROOT / "runs" / "tiny_model"

SHAPE = dict(
    vocab_size=2048, hidden_size=192, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=48, global_head_dim=64, num_global_key_value_heads=1, sliding_window=64,
    layer_types=["sliding_attention"] * 3 + ["full_attention"], num_experts=4, top_k_experts=2,
    moe_intermediate_size=192, max_position_embeddings=4096,
)
CANVAS = 64


def hf_config(dtype: str = "float32") -> dict:
    """config.json in the layout `transformers` writes for DiffusionGemmaForBlockDiffusion."""
    text = dict(SHAPE)
    global_layer = {
        "head_dim": text.pop("global_head_dim"),
        "num_key_value_heads": text.pop("num_global_key_value_heads"),
    }
    per_layer = {str(i): global_layer for i, t in enumerate(SHAPE["layer_types"]) if t == "full_attention"}
    text.update(
        model_type="diffusion_gemma_text", per_layer_config=per_layer, hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True,
        attention_bias=False, final_logit_softcapping=30.0, dtype=dtype,
        rope_parameters={
            "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0, "rope_type": "proportional"},
            "sliding_attention": {"rope_theta": 10_000.0, "rope_type": "default"},
        },
    )
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
        "canvas_length": CANVAS, "tie_word_embeddings": True, "dtype": dtype, "text_config": text,
        "boi_token_id": None, "eoi_token_id": None, "image_token_id": None,
    }


def init_weights(model: DiffusionGemma, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def export_checkpoint(model: DiffusionGemma, tokenizer_json: str, out: Path, meta: dict) -> None:
    """Write config.json, generation_config.json, model.safetensors (HF keys, float32) and tokenizer.json.
    Sampler defaults already in out/generation_config.json are kept."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu", torch.float32).contiguous()
        if name.endswith("encoder_layer_scalar"):
            tensors["model.encoder.language_model." + name.replace("encoder_layer_scalar", "layer_scalar")] = t
        elif name.endswith("decoder_layer_scalar"):
            tensors["model.decoder." + name.replace("decoder_layer_scalar", "layer_scalar")] = t
        else:
            tensors["model.decoder." + name.replace("self_conditioning.mlp.", "self_conditioning.")] = t
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(), indent=2))
    gen = {"eos_token_id": [1], "pad_token_id": 0, "bos_token_id": 2,
           "transformers_version": "5.24.0"}
    old = out / "generation_config.json"
    if old.is_file():  # sampler defaults chosen by tune_sampler --write survive a re-export
        gen.update({k: v for k, v in json.loads(old.read_text()).items() if k in (*DIFFUSION_PARAMS, "sampler_config")})
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    (out / "tokenizer.json").write_text(tokenizer_json)
    (out / "training_meta.json").write_text(json.dumps(meta, indent=2))


def prepare_data(work: Path, vocab: int, tokenizer_json: str | None = None) -> tuple[str, torch.Tensor]:
    """The tokenizer (trained here unless given) and the training files as one id stream, cached in work."""
    tok_path, ids_path = work / "tokenizer.json", work / "train_ids.pt"
    if tok_path.is_file() and ids_path.is_file():
        return tok_path.read_text(), torch.load(ids_path)
    texts = read_texts(held_out=False)
    if tokenizer_json is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(tokenizer_json)
    else:
        tok = train_tokenizer(random.Random(0).sample(texts, min(len(texts), 600)), vocab)
    data = torch.tensor(id_stream(tok, texts), dtype=torch.int16 if vocab < 32768 else torch.int32)
    work.mkdir(parents=True, exist_ok=True)
    tok_path.write_text(tok.to_str())
    torch.save(data, ids_path)
    return tok.to_str(), data


def batch(data: torch.Tensor, b: int, gen: torch.Generator, device: torch.device,
          max_prefix: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """b windows of the id stream: a clean prefix of 16..max_prefix tokens and a CANVAS-token target."""
    p = int(torch.randint(16, max_prefix + 1, (1,), generator=gen))
    starts = torch.randint(0, data.numel() - p - CANVAS - 1, (b,), generator=gen)
    rows = torch.stack([data[s : s + p + CANVAS].long() for s in starts.tolist()])
    return rows[:, :p].to(device), rows[:, p:].to(device)


def lr_at(step: int, total: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--minutes", type=float, default=None, help="stop (and export) after this wall time")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--span-fraction", type=float, default=0.5,
                    help="share of examples whose noise is one contiguous span with clean context on both sides")
    ap.add_argument("--span-min-noise", type=float, default=0.5,
                    help="lowest share of a span example's gap that is noised (the loop's late steps have few)")
    ap.add_argument("--max-prefix", type=int, default=128, help="longest clean prefix (16..N tokens per batch)")
    ap.add_argument("--export-only", action="store_true")
    ap.add_argument("--warm-restart", action="store_true",
                    help="restart the learning-rate schedule (warm-up, cosine to --steps) at this run's first step")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="start from an exported checkpoint (e.g. the shipped one) when --workdir has no state")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    shipped_tok = None
    if a.init_from is not None and not (a.workdir / "state.pt").is_file():
        shipped_tok = (a.init_from / "tokenizer.json").read_text()
    tok_json, data = prepare_data(a.workdir, SHAPE["vocab_size"], shipped_tok)
    model = DiffusionGemma(parse_config(hf_config("float32"))).to(device)
    init_weights(model, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.98), weight_decay=0.01)
    state_path = a.workdir / "state.pt"
    step, seen, elapsed, origin = 0, 0, 0.0, 0  # origin: the step the learning-rate schedule starts from
    gen = torch.Generator().manual_seed(1234)
    if state_path.is_file():
        st = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, seen, elapsed = st["step"], st["tokens_seen"], st.get("elapsed_s", 0.0)
        origin = st.get("lr_origin", 0)
        gen.set_state(st["gen"])
        print(f"resumed at step {step} ({seen:,} tokens, {elapsed / 60:.1f} min)", flush=True)
    elif a.init_from is not None:
        # A fresh machine resumes from the committed checkpoint: weights and counters (not Adam's moments).
        from service.model.loading import load_model

        _, shipped = load_model(a.init_from, dtype="float32")
        model.load_state_dict(shipped.state_dict())
        meta0 = json.loads((a.init_from / "training_meta.json").read_text())
        step, seen, elapsed = meta0["steps"], meta0["tokens_seen"], meta0["train_minutes"] * 60
        print(f"initialised from {a.init_from} at step {step}", flush=True)
    if a.warm_restart and not state_path.is_file():
        origin = step
    meta = lambda: {"steps": step, "tokens_seen": seen, "train_minutes": round(elapsed / 60, 1),
                    "device": str(device), "torch_threads": a.threads, "batch": a.batch, "shape": SHAPE,
                    "canvas_length": CANVAS}
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))  # save and export, then exit
    if not a.export_only:
        t0 = time.time()
        log = (a.workdir / "log.jsonl").open("a")
        model.train()
        while step < a.steps:
            if stop["now"] or (a.minutes is not None and (time.time() - t0) / 60 >= a.minutes):
                break
            for group in opt.param_groups:
                group["lr"] = lr_at(step - origin, a.steps - origin, a.lr)
            prefix, clean = batch(data, a.batch, gen, device, a.max_prefix)
            loss, info = loss_step(model, prefix, clean, gen, a.span_fraction, a.span_min_noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            seen += prefix.numel() + clean.numel()
            now = time.time()
            info.update(step=step, tokens_seen=seen, elapsed_s=round(elapsed + now - t0, 1),
                        lr=opt.param_groups[0]["lr"])
            log.write(json.dumps(info) + "\n")
            bar = "#" * int(30 * step / a.steps)
            sys.stdout.write(f"\r[{bar:<30}] step {step}/{a.steps} loss {info['loss']:.3f} "
                             f"acc {info['noised_acc']:.3f} {info['elapsed_s'] / 60:.1f} min")
            sys.stdout.flush()
            if step % a.save_every == 0 or step == a.steps:
                log.flush()
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "tokens_seen": seen,
                            "gen": gen.get_state(), "elapsed_s": elapsed + now - t0, "lr_origin": origin}, state_path)
        elapsed += time.time() - t0
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "tokens_seen": seen,
                    "gen": gen.get_state(), "elapsed_s": elapsed, "lr_origin": origin}, state_path)
        print()
    model.eval()
    export_checkpoint(model, tok_json, a.out, meta())
    print(f"exported {a.out} after {step} steps, {seen:,} tokens", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
