"""FP8 per-tensor against per-channel weight scales, on ModelOpt's own fake-quant forward (W8A8: weights AND
activations quantized), against the unquantized reference model.

`python benchmarks/fp8_scaling.py [--prompts 8] [--calibration-steps 8] [--threads 1]` prints one JSON object.

For each scaling it calibrates transformers' DiffusionGemma (the embedded tiny model by default) on the built-in
prompt set through `dgemma build`'s own calibration loop, then feeds both models identical inputs: each held-out
prompt, and canvases at four noise levels made from the unquantized model's output. Reported: argmax token
agreement and mean KL(unquantized || quantized) of the decoder logits. `dgemma build`'s verification measures the
exported build instead (weights dequantized at load, activations not quantized): both figures are in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine  # noqa: E402
from engine_build.calibration import (CalibrationSettings, builtin_prompts, forward_loop,  # noqa: E402
                                      heldout_prompts)
from engine_build.quantize import FP8_SCALINGS, quantize  # noqa: E402
from engine_build.reference import generation_ids, load_reference  # noqa: E402
from service import DEFAULT_CHECKPOINT  # noqa: E402
from service.model.config import read_config  # noqa: E402
from service.text.tokenizer import load_tokenizer  # noqa: E402

NOISE = (1.0, 0.5, 0.25, 0.0)


@torch.no_grad()
def decoder_logits(model, prompt: list[int], canvas: torch.Tensor) -> torch.Tensor:
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    return model(input_ids=torch.tensor([prompt]), cache=cache, decoder_input_ids=canvas[None]).logits[0].float()


def inputs(ref, prompts: list[list[int]], canvas: int, eos: list[int],
           pad: int) -> list[tuple[list[int], torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    vocab = ref.config.get_text_config().vocab_size
    out = []
    for ids in prompts:
        torch.manual_seed(0)
        seq = ref.generate(torch.tensor([ids]), max_new_tokens=canvas, max_denoising_steps=8, eos_token_id=eos,
                           pad_token_id=pad, confidence_threshold=1e-9).sequences[0, len(ids):len(ids) + canvas]
        base = torch.nn.functional.pad(seq, (0, canvas - len(seq)), value=pad)
        for level in NOISE:
            noisy = torch.rand(canvas, generator=g) < level
            out.append((ids, torch.where(noisy, torch.randint(0, vocab, (canvas,), generator=g), base)))
    return out


def compare(ref, quant, cases) -> dict:
    same = total = 0
    kls = []
    for ids, canvas in cases:
        lp = torch.log_softmax(decoder_logits(ref, ids, canvas), -1)
        lq = torch.log_softmax(decoder_logits(quant, ids, canvas), -1)
        kls.append(float((lp.exp() * (lp - lq)).sum(-1).mean()))
        same += int((lp.argmax(-1) == lq.argmax(-1)).sum())
        total += lp.shape[0]
    return {"token_agreement": round(same / total, 6), "mean_kl": sum(kls) / len(kls)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--prompts", type=int, default=8, help="held-out prompts")
    ap.add_argument("--calibration-prompts", type=int, default=None, help="first N built-in prompts (default all)")
    ap.add_argument("--calibration-steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    src = a.checkpoint
    eos, pad, bos = generation_ids(src)
    tok = load_tokenizer(src, bos)
    canvas = read_config(src).canvas_length
    calib = [tok.encode(p) for p in builtin_prompts().prompts[: a.calibration_prompts]]
    ref = load_reference(src)
    cases = inputs(ref, [tok.encode(p) for p in heldout_prompts()[: a.prompts]], canvas, eos, pad)
    result = {"machine": machine(), "checkpoint": src.name, "held_out_prompts": a.prompts,
              "calibration_prompts": len(calib), "noise_levels": list(NOISE), "forward": "modelopt fake-quant W8A8"}
    for scaling in FP8_SCALINGS:
        started = time.perf_counter()
        model = load_reference(src)
        quantize(model, "fp8", forward_loop(calib, CalibrationSettings(steps=a.calibration_steps), canvas, eos, pad),
                 scaling)
        result[scaling] = {**compare(ref, model, cases), "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
