"""Decoder graphs per batch bucket: what is captured, when, and that replays give the eager pass's bits.

CUDA graph capture itself needs a GPU (unverified here); `capture` is injected, and this stand-in runs
the same function again into the same output buffer, as a replay does.
"""

import torch

from service.engine.cuda_graphs import BUCKETS, DecoderGraphs, bucket_for
from service.engine.registry import create_runner


def rerun_capture(fn):
    out = fn()
    return (lambda: out.copy_(fn())), out


def test_buckets():
    assert [bucket_for(n) for n in (1, 2, 3, 5, 9, 17, 33, 64)] == [1, 2, 4, 8, 16, 32, 64, 64]
    assert bucket_for(BUCKETS[-1] + 1) is None


def test_graphs_capture_a_repeating_batch_and_replay_it_exactly(small_ckpt):
    runner = create_runner("torch", checkpoint_dir=small_ckpt)
    model, cfg = runner.model, runner.config
    graphs = DecoderGraphs(model.decode, cfg.canvas_length, cfg.hidden_size, model.dtype, runner.device,
                           capture=rerun_capture)
    g = torch.Generator().manual_seed(0)
    caches = [runner.new_cache(40) for _ in range(3)]
    runner.prefill([torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in (4, 9, 6)], caches)
    canvas = torch.randint(0, cfg.vocab_size, (3, cfg.canvas_length), generator=g)
    soft = torch.randn(3, cfg.canvas_length, cfg.hidden_size, generator=g)
    eager = model.decode(canvas, soft, caches)

    first = graphs.decode(canvas, soft, caches)  # a batch seen once runs eagerly
    assert graphs.captures == 0 and torch.equal(first, eager)
    second = graphs.decode(canvas, soft, caches)  # seen twice in a row: captured (bucket 4, one padding row)
    assert graphs.captures == 1 and second.shape == eager.shape and torch.equal(second, eager)
    third = graphs.decode(canvas, None, caches)  # replayed; no self-conditioning input means zeros
    assert graphs.replays == 2 and torch.equal(third, model.decode(canvas, None, caches))

    runner.prefill([torch.tensor([5, 6])], caches[:1])  # a commit changes a cache: a new key, eager again
    assert torch.equal(graphs.decode(canvas, soft, caches), model.decode(canvas, soft, caches))
    assert graphs.captures == 1
    graphs.decode(canvas, soft, caches)
    assert graphs.captures == 2
    graphs.decode(canvas[:1], soft[:1], caches[:1])
    graphs.decode(canvas[:1], soft[:1], caches[:1])
    assert graphs.captures == 3 and len(graphs._graphs) == 2  # the oldest graph was dropped


def test_a_failed_capture_runs_that_bucket_eagerly(small_ckpt):
    runner = create_runner("torch", checkpoint_dir=small_ckpt)
    model, cfg = runner.model, runner.config

    def broken(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs = DecoderGraphs(model.decode, cfg.canvas_length, cfg.hidden_size, model.dtype, runner.device, capture=broken)
    caches = [runner.new_cache(8)]
    runner.prefill([torch.tensor([2, 3])], caches)
    canvas = torch.zeros(1, cfg.canvas_length, dtype=torch.long)
    for _ in range(3):
        assert torch.equal(graphs.decode(canvas, None, caches), model.decode(canvas, None, caches))
    assert graphs.captures == 0 and 1 in graphs._eager_buckets
