"""The runner seam: the scheduler's only way to the network; a step's tensors stay on the runner's
device; no step allocates more than tile x V elements."""

import ast
import inspect

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from service.engine import scheduler as scheduler_module
from service.engine import sequence as sequence_module
from service.engine.api import FinalEvent, Request
from service.engine.local import LocalEngine
from service.engine.registry import create_engine, create_runner
from service.engine.sequence import Sequence
from service.model.network import DiffusionGemma
from service.sampler.params import GenerationParams
from tests.checkpoints import build_reference, save_checkpoint


class Recorder(TorchDispatchMode):
    """Every tensor an op returns (op, device, element count, shape), and those among them that own new
    memory (`allocated`: not a view, not an in-place result)."""

    def __init__(self):
        super().__init__()
        self.outputs: list[tuple[str, torch.device, int, tuple]] = []
        self.allocated: list[tuple[str, torch.device, int, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor) and a.device.type != "meta"}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                row = (str(func), t.device, t.numel(), tuple(t.shape))
                self.outputs.append(row)
                if t.device.type != "meta" and t.untyped_storage().data_ptr() not in inputs:
                    self.allocated.append(row)
        return out


class SeamGuard:
    """Wraps a runner; the network's own entry points may run only inside one of its calls."""

    def __init__(self, runner, monkeypatch):
        self._runner, self.inside, self.calls = runner, False, []
        for name in ("encode", "decode", "logits", "soft_embedding"):
            real = getattr(DiffusionGemma, name)

            def guarded(model, *a, _real=real, _name=name, **k):
                assert self.inside, f"DiffusionGemma.{_name} called outside the runner"
                return _real(model, *a, **k)

            monkeypatch.setattr(DiffusionGemma, name, guarded)

    def __getattr__(self, name):
        attr = getattr(self._runner, name)
        if not callable(attr) or name not in ("prefill", "step"):
            return attr

        def call(*a, **k):
            self.calls.append(name)
            self.inside = True
            try:
                return attr(*a, **k)
            finally:
                self.inside = False

        return call


def test_the_scheduler_reaches_the_network_only_through_the_runner(small_ckpt, monkeypatch):
    guard = SeamGuard(create_runner("torch", checkpoint_dir=small_ckpt), monkeypatch)
    engine = LocalEngine(small_ckpt, guard)
    p = GenerationParams(max_new_tokens=2 * engine.config.canvas_length, max_denoising_steps=3)
    final = list(engine.generate(Request([2, 5, 6], p, seed=4)))[-1]
    assert isinstance(final, FinalEvent) and len(final.token_ids) == 2 * engine.config.canvas_length
    assert guard.calls.count("prefill") == 2 and guard.calls.count("step") == final.stats.decoder_passes
    # and the loop's modules hold no network: nothing of service.model.network, no nn.Module attribute
    for module in (scheduler_module, sequence_module):
        imported = {n.module for n in ast.walk(ast.parse(inspect.getsource(module)))
                    if isinstance(n, ast.ImportFrom)}
        assert "service.model.network" not in imported and "service.model.loading" not in imported
    assert not any(isinstance(v, torch.nn.Module) for v in vars(engine.scheduler).values())


def test_an_unknown_device_and_a_missing_cuda_fail_clearly(small_ckpt):
    from service.errors import InvalidArgument, Unavailable

    with pytest.raises(InvalidArgument, match="device"):
        create_engine(checkpoint_dir=small_ckpt, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(Unavailable, match="no CUDA device"):
            create_engine(checkpoint_dir=small_ckpt, device="cuda")
    with pytest.raises(InvalidArgument, match="tile_rows"):
        create_engine(checkpoint_dir=small_ckpt, tile_rows=0)


def test_a_step_keeps_every_tensor_on_the_runners_device(small_ckpt):
    """On PyTorch's meta device (no data, device checks as on a GPU): a CPU generator, a CPU tensor mixed into
    a step, or a result left on the CPU fails here (the bug that made the first GPU step fail)."""
    runner = create_runner("torch", checkpoint_dir=small_ckpt, device="meta", dtype="bfloat16")
    engine = LocalEngine(small_ckpt, runner)
    cfg = engine.config
    seqs = [Sequence(r.validate(cfg), cfg, engine.eos_ids, engine.pad_id, runner.new_generator(r.seed), runner.device)
            for r in (Request([2, 3, 4], GenerationParams(max_denoising_steps=4), seed=1),
                      Request([2, 9], GenerationParams(max_denoising_steps=6, sampler="reference"), seed=2))]
    with Recorder() as rec:
        for s in seqs:
            s.cache = runner.new_cache(Sequence.max_tokens(s.request, cfg.canvas_length))
        runner.prefill([s.to_encode for s in seqs], [s.cache for s in seqs])
        for s in seqs:
            s.begin_canvas()
        for _ in range(2):  # a first step (no self-conditioning input) and a second
            out = runner.step([s.step_input() for s in seqs])
            flags = [s.stop_flags(out.argmax[b], out.entropy[b]) for b, s in enumerate(seqs)]
            for b, s in enumerate(seqs):
                s.canvas, s.soft = out.canvas[b], out.soft[b]
                s.stable_run, s.argmax = s._next_run, out.argmax[b]
                s.step, s.steps = s.step - 1, s.steps + 1
    off = {(op, str(dev)) for op, dev, _, _ in rec.outputs if dev.type != "meta"}
    assert not off, off
    assert len(rec.outputs) > 100 and all(f.device.type == "meta" for f in flags)
    assert out.canvas.device.type == out.soft.device.type == "meta"


def test_no_step_allocates_more_than_a_tile_of_the_vocabulary(tmp_path):
    """At the real vocabulary (262,144) with a tiny network: the largest tensor any op makes is one tile."""
    vocab = 262_144
    ckpt = save_checkpoint(build_reference("canvas", seed=1, vocab_size=vocab, hidden_size=16), tmp_path / "big-v")
    largest = {}
    for tile in (8, 24):  # 24: the canvas, a whole canvas per tile (the CPU default)
        engine = create_engine(checkpoint_dir=ckpt, tile_rows=tile)
        sched = engine.scheduler
        for seed, sampler in enumerate(("reference", "fast", "reference")):
            sched.submit(Request([2, 7, 8], GenerationParams(max_new_tokens=24, max_denoising_steps=3, sampler=sampler),
                                 seed=seed))
        sched.step()  # admission, prefill and the first step (their allocations are not the step's)
        with Recorder() as rec:
            sched.step()  # a step over three canvases with self-conditioning
        assert sched.canvases_in_last_pass == 3
        largest[tile] = max(rec.allocated, key=lambda o: o[2])
        assert largest[tile][2] <= tile * vocab, largest[tile]
    assert largest[24][2] > 8 * vocab  # the check sees the tile: a whole-canvas tile is larger


def test_admission_counts_the_steps_transient_memory(small_ckpt):
    from service.engine.scheduler import Limits
    from service.model.kv_pool import BLOCK

    runner = create_runner("torch", checkpoint_dir=small_ckpt)
    assert runner.step_bytes(8) > runner.step_bytes(1) > runner.tile_rows * runner.config.vocab_size * 4
    p = GenerationParams(max_new_tokens=16, max_denoising_steps=2)
    tokens = Sequence.max_tokens(Request([2, 3], p), runner.config.canvas_length)
    kv = -(-tokens // BLOCK) * BLOCK * runner.kv_bytes_per_token()  # one request's reservation, in whole blocks
    # the KV pool is the budget less the largest step's transients: room for two requests' caches, not three
    budget = 2 * kv + kv // 2 + runner.step_bytes(3)
    engine = LocalEngine(small_ckpt, runner, Limits(max_live_canvases=3, max_memory_bytes=budget))
    assert runner.pool.nbytes() <= budget - runner.step_bytes(3) + runner.pool.block_bytes()
    streams = [engine.scheduler.submit(Request([2, 3], p, seed=i)) for i in range(3)]
    engine.scheduler.step()
    assert engine.scheduler.live_canvases == 2 and engine.scheduler.queue_depth == 1
    while engine.scheduler.step():
        pass
    assert all(isinstance(list(s)[-1], FinalEvent) for s in streams)
