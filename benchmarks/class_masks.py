"""How long the structured-output class masks take to build for a Gemma-sized vocabulary.

`python benchmarks/class_masks.py [--vocab 262144]` prints one JSON object.

The engine builds the masks (bool [classes, V]) once, on the first request with constraints, from every
id decoded on its own. The real Gemma tokenizer cannot be downloaded here, so this builds a synthetic
byte-level BPE `tokenizer.json` of the requested size (the 256 byte symbols, then random merges of
printable ASCII, space and newline pieces, so every id decodes to valid text; Gemma's special tokens)
and times `build_class_masks` on it: decoding and classifying every id.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine  # noqa: E402
from service.text.tokenizer import Tokenizer  # noqa: E402
from service.sampler.constraints import build_class_masks  # noqa: E402
from tools.tiny_model.tokenizer import SPECIALS  # noqa: E402  (Gemma's special-token layout)


def synthetic_tokenizer_json(vocab: int, seed: int = 0) -> str:
    """A byte-level BPE tokenizer.json with `vocab` ids: specials, the 256 byte symbols, random merges."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers

    rng = random.Random(seed)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab_map = {t: i for i, t in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab_map.setdefault(ch, len(vocab_map))
    base = [chr(c) for c in range(33, 127)] + ["\u0120", "\u010a"]  # printable ASCII, space, newline
    short = list(base)  # pieces that may grow (up to 8 symbols)
    merges = []
    while len(vocab_map) < vocab:
        a, b = rng.choice(short), rng.choice(base)
        if a + b in vocab_map:
            continue
        vocab_map[a + b] = len(vocab_map)
        merges.append((a, b))
        if len(a + b) < 8:
            short.append(a + b)
    tok = HF(models.BPE(vocab=vocab_map, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok.to_str()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--vocab", type=int, default=262_144)
    a = ap.parse_args()
    path = Path(tempfile.mkdtemp(prefix="dgemma-masks-")) / "tokenizer.json"
    path.write_text(synthetic_tokenizer_json(a.vocab))
    tok = Tokenizer(path, bos_id=2)
    t = time.perf_counter()
    texts = tok.token_texts()
    decode_s = time.perf_counter() - t
    t = time.perf_counter()
    masks = build_class_masks(tok, tok.vocab_size, {0, 1, 2})
    total_s = time.perf_counter() - t
    print(json.dumps({"vocab": tok.vocab_size, "decode_every_id_s": round(decode_s, 2),
                      "build_class_masks_s": round(total_s, 2), "allowed_per_class": masks.sum(1).tolist(),
                      "distinct_texts": len(set(texts)), **machine()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
