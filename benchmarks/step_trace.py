"""One scheduler step at the real DiffusionGemma shape, traced on PyTorch's meta device (no memory, no data).

`python benchmarks/step_trace.py [--small] [--canvases 1,8,32,64]` prints one JSON line:

- `weight_bytes_per_step`: bytes of parameter tensors the step's ops read, per number of live canvases. Each
  op's parameter inputs count whole (a grouped expert GEMM over many rows reads every expert's weights), views
  count nothing (the op that consumes them counts), and gathers (embedding lookups, indexing) count the rows
  they read. The same weight read by two ops counts twice: it crosses the memory bus twice.
- `weight_bytes_ratio_32_to_1`: the 32-canvas figure over the 1-canvas one (goal <= 1.2).
- `sampler_tile_rows`: the largest vocabulary tile the step used. The meta device has no memory, so the runner is
  given the tile a GPU with `--device-memory` bytes gets by default in throughput mode (`tiles.tile_rows_for`:
  10% of the card; default: an 80 GB H100's 85,520,809,984 bytes, `sampler_device_memory_bytes`), growing with
  the step's rows: min(that, canvases x 256) rows per tile, unpadded. Each tile reads the tied embedding twice.
- `host_syncs`: data-dependent host reads in a steady-state step before its one stop-flag transfer: `.item()`,
  `.tolist()`, `bool()`/`int()` of a tensor, copies to the CPU, `nonzero`, and `torch.tensor(host values,
  device=...)` (a host-to-device copy). On meta these raise; the trace records them and returns a fake value
  (zeros, False) so the step goes on. `host_sync_sites` names where each came from.
- `stop_flag_transfers`: the step's allowed stop-flag read (1 per step with live canvases).
- `ops_per_step`: aten ops dispatched in the step (views included).
- `captures`: CUDA-graph captures over a 200-step synthetic trace with staggered joins, leaves and commits, through
  `DecoderGraphs` with an injected capture (the stand-in the tests use), `graph_buckets` (batch buckets) for
  comparison, and `graph_keys_seen`: the (batch bucket, key-length bucket) pairs the trace visited.

The step traced is the third of a batch of one-canvas requests that joined together (prefill and two decoder
steps before it), so it has a self-conditioning input and does not commit. The model is bf16; FP8 and NVFP4
builds read fewer bytes per expert weight (docs/benchmarks.md scales the figures).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from types import SimpleNamespace
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_real_shape import real_config, toy_config  # noqa: E402
from service.engine.api import Request  # noqa: E402
from service.engine.cuda_graphs import BUCKETS, DecoderGraphs, bucket_for, kv_bucket_for  # noqa: E402
from service.engine.local import LocalEngine  # noqa: E402
from service.engine.scheduler import Limits, Scheduler  # noqa: E402
from service.engine.torch_runner import TorchRunner  # noqa: E402
from service.model.config import ModelConfig  # noqa: E402
from service.model.kv_pool import BLOCK  # noqa: E402
from service.model.network import DiffusionGemma  # noqa: E402
from service.sampler.params import GenerationParams  # noqa: E402
from service.sampler.tiles import tile_rows_for  # noqa: E402

aten = torch.ops.aten
# Ops that read only some rows of a parameter: they count the bytes they return.
_GATHERS = {aten.embedding.default, aten.index.Tensor, aten.index_select.default, aten.gather.default}
_SCALAR_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.item.default}
_DATA_SHAPED = {aten.nonzero.default, aten.masked_select.default}
_SERVICE = str(Path(__file__).resolve().parents[1] / "service")
_STOP_FLAGS_SITE = "engine/scheduler.py:_decode_live"
H100_MEMORY = 85_520_809_984  # torch.cuda.get_device_properties(...).total_memory of an 80 GB H100, bytes


def _site() -> str:
    """The innermost frame in service/: 'engine/runner.py:denoise'."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(_SERVICE):
            return f"{name[len(_SERVICE) + 1:]}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "outside service/"


class HostRead(BaseException):
    """A data-dependent host read inside a step (StepTrace(strict=True)). A BaseException: the scheduler turns
    an Exception in a step into failed requests, and this must fail the caller."""


class StepTrace(TorchDispatchMode):
    """Counts ops, parameter bytes read and host reads; fakes the host reads' values so a meta step runs."""

    def __init__(self, params: list[torch.Tensor], strict: bool = False) -> None:
        """strict: a host read other than the stop-flag transfer raises HostRead (the tests' mode)."""
        super().__init__()
        self.strict = strict
        self.storages = {p.untyped_storage()._cdata for p in params}
        self.ops = 0
        self.weight_bytes = 0
        self.weight_sites: Counter[str] = Counter()  # site -> bytes
        self.syncs: Counter[str] = Counter()  # "kind at site" -> count
        self._tensor = torch.tensor

    def __enter__(self):
        torch.tensor = self._counting_tensor  # torch.tensor(host data, device=...) dispatches no op to see
        return super().__enter__()

    def __exit__(self, *exc):
        torch.tensor = self._tensor
        return super().__exit__(*exc)

    def _counting_tensor(self, data, *args, **kwargs):
        device = kwargs.get("device")
        if device is not None and torch.device(device).type != "cpu" and not isinstance(data, torch.Tensor):
            self._note(f"torch.tensor(host values) at {_site()}")
        return self._tensor(data, *args, **kwargs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        self._count_weights(func, args, kwargs)
        fake = self._host_read(func, args, kwargs)
        return fake if fake is not None else func(*args, **kwargs)

    def _count_weights(self, func, args, kwargs) -> None:
        if func.is_view:
            return
        read = [t for t in tree_flatten((args, kwargs))[0]
                if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata in self.storages]
        if not read:
            return
        if func in _GATHERS:
            out = func(*args, **kwargs)
            nbytes = out.numel() * out.element_size()
        else:
            nbytes = sum(t.numel() * t.element_size() for t in read)
        self.weight_bytes += nbytes
        self.weight_sites[_site()] += nbytes

    def _host_read(self, func, args, kwargs):
        """A fake result for a data-dependent host read (recorded), or None for any other op."""
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if src is None or src.device.type == "cpu":
            return None
        if func in _SCALAR_READS:
            self._record(func)
            return False if func is aten.is_nonzero.default else 0
        if func is aten._to_copy.default and torch.device(kwargs.get("device") or src.device).type == "cpu":
            self._record(func)
            return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype)
        if func in _DATA_SHAPED:  # as if every element were selected
            self._record(func)
            return torch.empty(src.numel(), src.dim(), dtype=torch.long, device=src.device) \
                if func is aten.nonzero.default else torch.empty(src.numel(), dtype=src.dtype, device=src.device)
        return None

    def _record(self, func) -> None:
        self._note(f"{func.__name__} at {_site()}")

    def _note(self, what: str) -> None:
        if self.strict and not what.endswith(_STOP_FLAGS_SITE):
            raise HostRead(f"host read inside a step: {what}")
        self.syncs[what] += 1

    def host_syncs(self) -> int:
        """Host reads other than the stop-flag transfer."""
        return sum(n for k, n in self.syncs.items() if not k.endswith(_STOP_FLAGS_SITE))

    def stop_flag_transfers(self) -> int:
        return sum(n for k, n in self.syncs.items() if k.endswith(_STOP_FLAGS_SITE))


def meta_model(cfg: ModelConfig) -> DiffusionGemma:
    """The network on the meta device in bf16, as loading builds it before weights arrive."""
    with torch.device("meta"):
        model = DiffusionGemma(cfg)
    model = model.to(torch.bfloat16)
    model.reset_buffers()
    return model.eval()


def steady_scheduler(cfg: ModelConfig, model: DiffusionGemma, canvases: int, prompt: int,
                     requests: list[Request] | None = None, device_memory: int = H100_MEMORY) -> Scheduler:
    """A scheduler with `canvases` one-canvas requests (or `requests`) past their prefill and first two
    decoder steps, its sampler tiles those of a GPU with `device_memory` bytes in throughput mode and its attention
    the op set a CUDA step replays from its graph (the batched, padded attention over the KV pool)."""
    tile = tile_rows_for(cfg.canvas_length, cfg.vocab_size, device_memory)
    runner = TorchRunner.from_model(cfg, model, tile_rows=tile, cuda_graphs=False, fixed_tile=False,
                                    batched_attention=True)
    limits = Limits(max_live_canvases=canvases, max_queue=canvases, max_memory_bytes=1 << 60)
    engine = LocalEngine(tempfile.mkdtemp(prefix="dgemma-trace-"), runner, limits)
    params = GenerationParams(max_new_tokens=cfg.canvas_length, max_denoising_steps=16)
    sched = engine.scheduler
    for i in range(canvases):
        sched.submit(requests[i] if requests else Request([2] + [5] * (prompt - 1), params, seed=i))
    with StepTrace(list(model.parameters())):  # meta host reads would raise outside the trace
        for _ in range(2):
            sched.step()
    assert sched.canvases_in_last_pass == canvases
    return sched


def trace_step(cfg: ModelConfig, model: DiffusionGemma, canvases: int, prompt: int,
               device_memory: int = H100_MEMORY) -> StepTrace:
    sched = steady_scheduler(cfg, model, canvases, prompt, device_memory=device_memory)
    trace = StepTrace(list(model.parameters()))
    with trace:
        sched.step()
    assert sched.canvases_in_last_pass == canvases
    return trace


class _FakeCache:
    """What DecoderGraphs reads of a PagedCache: its host length, its length on the device and its block table."""

    def __init__(self, length: int, capacity: int) -> None:
        self.table = torch.arange(1, 1 + -(-capacity // BLOCK))
        self.length_t = torch.zeros(1, dtype=torch.long)
        self.length = length

    @property
    def length(self) -> int:
        return self._length

    @length.setter
    def length(self, n: int) -> None:
        self._length = n
        self.length_t.fill_(n)


def graph_captures(steps: int = 200, seed: int = 0, max_live: int = 16) -> dict:
    """Captures and replays of DecoderGraphs over a synthetic trace: requests join every few steps, run 1-3
    canvases of 8-24 steps each (a commit grows the cache by a canvas) and leave; some are cancelled."""
    rng = random.Random(seed)
    length, hidden = 4, 2
    captured = []

    def capture(fn):
        out = fn()
        captured.append(1)
        return (lambda: out.copy_(fn())), out

    pool = SimpleNamespace(k=[], v=[])
    graphs = DecoderGraphs(lambda canvas, soft, pool, table, lengths, kv_len: torch.zeros(canvas.shape[0], length,
                                                                                          hidden),
                           pool, length, hidden, torch.float32, torch.device("cpu"), capture=capture)
    live: list[dict] = []
    keys = set()
    for step in range(steps):
        if len(live) < max_live and (step % 3 == 0 or rng.random() < 0.1):
            canvases, prompt = rng.randint(1, 3), rng.randint(16, 512)
            live.append({"cache": _FakeCache(prompt, prompt + canvases * length), "canvases": canvases,
                         "left": rng.randint(8, 24)})
        live = [r for r in live if rng.random() > 0.005]  # a cancellation now and then
        if not live:
            continue
        caches = [r["cache"] for r in live]
        graphs.decode(torch.zeros(len(live), length, dtype=torch.long), None, caches)
        keys.add((bucket_for(len(live)), kv_bucket_for(max(c.length for c in caches) + length)))
        for r in live:
            r["left"] -= 1
            if r["left"] == 0:  # commit: the canvas joins the cache; the request leaves after its last
                r["canvases"] -= 1
                r["cache"].length += length
                r["left"] = rng.randint(8, 24)
        live = [r for r in live if r["canvases"] > 0]
    return {"captures": graphs.captures, "replays": graphs.replays, "trace_steps": steps,
            "graph_keys_seen": len(keys)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="a toy config (a smoke check, not the real shape)")
    ap.add_argument("--canvases", default="1,8,32,64")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--device-memory", type=int, default=H100_MEMORY,
                    help="bytes of the GPU whose default sampler tile the trace uses (default: an 80 GB H100's)")
    a = ap.parse_args(argv)
    cfg = toy_config() if a.small else real_config()
    model = meta_model(cfg)
    counts = [int(x) for x in a.canvases.split(",")]
    traces = {n: trace_step(cfg, model, n, a.prompt, a.device_memory) for n in counts}
    weights = {str(n): t.weight_bytes for n, t in traces.items()}
    first = traces[counts[0]]
    out = {
        "config": "toy" if a.small else "real (26B-A4B, bf16)",
        "weight_bytes_per_step": weights,
        "weight_bytes_ratio_32_to_1": round(weights["32"] / weights["1"], 3) if {"1", "32"} <= weights.keys() else None,
        "sampler_tile_rows": tile_rows_for(cfg.canvas_length, cfg.vocab_size, a.device_memory),
        "sampler_device_memory_bytes": a.device_memory,
        "host_syncs": {str(n): t.host_syncs() for n, t in traces.items()},
        "host_sync_sites": dict(traces[counts[-1]].syncs),
        "weight_bytes_by_site": dict(traces[counts[-1]].weight_sites.most_common(6)),
        "stop_flag_transfers": first.stop_flag_transfers(),
        "ops_per_step": {str(n): t.ops for n, t in traces.items()},
        **graph_captures(),
        "graph_buckets": len(BUCKETS),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "torch": torch.__version__,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
