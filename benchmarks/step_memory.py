"""Peak transient memory of one denoising step at the real vocabulary (262,144), on the CPU.

`python benchmarks/step_memory.py [--batches 1,8,32] [--tile-rows N]` prints one JSON object: for each
number of live canvases and each sampler, two measurements of one step's transient memory. A tiny
network (hidden 64) keeps the decoder's share small, so what is measured is the vocabulary work:
canvas 256, as the real model's.
- `peak_*`: bytes held at once by tensors that ops create during a step (after the first, so
  self-conditioning runs), tracked through a torch dispatch mode (each new storage counted once until
  its last tensor is freed), and `largest_tensor_*`. A dispatch mode sees the calling thread only.
- `rss_*`: the growth of the process's peak resident memory over its first step, in a fresh process
  per measurement: it sees every thread (the code before the runner seam sampled canvases on a thread
  pool), at the price of allocator noise.

It runs on the code before the runner seam too (`service.engine.torch_engine`), for a before/after
comparison in the same way: check out the older commit and run this file there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import VISION, machine  # noqa: E402
from service.engine.api import Request  # noqa: E402
from service.sampler.params import GenerationParams  # noqa: E402

VOCAB, CANVAS = 262_144, 256
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, global_head_dim=32, num_global_key_value_heads=1, sliding_window=64,
            num_experts=4, top_k_experts=2, moe_intermediate_size=32)


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops create, alive at once: the peak, and the largest one."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = self.largest = 0
        self._refs: dict[int, list[int]] = {}  # storage pointer -> [tensors alive, nbytes]

    def _release(self, ptr: int) -> None:
        entry = self._refs[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr in self._refs:  # a view or an in-place result of a storage made in here
                self._refs[ptr][0] += 1
            elif ptr not in inputs and ptr != 0:  # a new storage
                nbytes = t.untyped_storage().nbytes()
                self._refs[ptr] = [1, nbytes]
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                self.largest = max(self.largest, nbytes)
            else:
                continue
            weakref.finalize(t, self._release, ptr)
        return out


def checkpoint() -> Path:
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    cfg = DiffusionGemmaConfig(text_config=dict(TEXT), vision_config=dict(VISION), canvas_length=CANVAS)
    torch.manual_seed(0)
    path = Path(tempfile.mkdtemp(prefix="dgemma-bigvocab-"))
    DiffusionGemmaForBlockDiffusion(cfg).eval().save_pretrained(path)
    return path


def scheduler(path: Path, tile_rows: int | None):
    """The scheduler over the code in this checkout: the runner seam's, or the one before it."""
    from service.engine.registry import create_engine
    from service.engine.scheduler import Limits

    limits = Limits(max_live_canvases=64)
    try:
        return create_engine(checkpoint_dir=path, tile_rows=tile_rows, limits=limits).scheduler, "runner seam"
    except TypeError:  # before the runner seam: TorchEngine, per-canvas sampling on threads
        from service.engine.scheduler import Scheduler
        from service.engine.torch_engine import TorchEngine

        return Scheduler(TorchEngine(path), limits), "before the runner seam"


def step_peak(path: Path, canvases: int, sampler: str, tile_rows: int | None) -> tuple[int, int, str]:
    sched, code = scheduler(path, tile_rows)
    params = GenerationParams(max_new_tokens=CANVAS, max_denoising_steps=8, sampler=sampler)
    for i in range(canvases):
        sched.submit(Request([2, 7, 8, 9], params, seed=i))
    sched.step()  # admission, prefill, first step
    with torch.no_grad(), LiveBytes() as mem:
        sched.step()
    assert sched.canvases_in_last_pass == canvases
    return mem.peak, mem.largest, code


def first_step_rss(path: Path, canvases: int, sampler: str, tile_rows: int | None) -> int:
    """In this (fresh) process: bytes by which the peak RSS grew over the first step."""
    sched, _ = scheduler(path, tile_rows)
    params = GenerationParams(max_new_tokens=CANVAS, max_denoising_steps=8, sampler=sampler)
    for i in range(canvases):
        sched.submit(Request([2, 7, 8, 9], params, seed=i))
    before = peak_rss()
    with torch.no_grad():
        sched.step()
    return peak_rss() - before


def peak_rss() -> int:
    """This process's peak resident bytes (VmHWM: unlike getrusage's ru_maxrss, not inherited from the parent
    across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (this measurement needs Linux)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--tile-rows", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rss-child", nargs=3, metavar=("CKPT", "CANVASES", "SAMPLER"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.rss_child:
        print(first_step_rss(Path(a.rss_child[0]), int(a.rss_child[1]), a.rss_child[2], a.tile_rows))
        return 0
    path = checkpoint()
    out: dict = {"vocab": VOCAB, "canvas": CANVAS, "unit": "MiB"}
    for sampler in ("fast", "reference"):
        for b in (int(x) for x in a.batches.split(",")):
            peak, largest, code = step_peak(path, b, sampler, a.tile_rows)
            out[f"peak_{sampler}_{b}"] = round(peak / 2**20, 1)
            out[f"largest_tensor_{sampler}_{b}"] = round(largest / 2**20, 1)
            out["code"] = code
            cmd = [sys.executable, __file__, "--threads", str(a.threads), "--rss-child", str(path), str(b), sampler]
            if a.tile_rows:
                cmd += ["--tile-rows", str(a.tile_rows)]
            child = subprocess.run(cmd, capture_output=True, text=True, check=True)
            out[f"rss_{sampler}_{b}"] = round(int(child.stdout.strip().splitlines()[-1]) / 2**20, 1)
    out.update(tile_rows=a.tile_rows or "default", **machine())
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
