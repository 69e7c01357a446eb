"""Decoder graphs per (batch bucket, key-length bucket): captured once, replayed whatever requests come and go, and
giving the row-by-row pass's results up to float rounding.

CUDA graph capture itself needs a GPU (unverified here); `capture` is injected, and this stand-in runs the same
function again into the same output buffer, as a replay does.
"""

import gc

import torch

from service.engine.cuda_graphs import BUCKETS, KV_BUCKET_MIN, DecoderGraphs, bucket_for, kv_bucket_for
from service.engine.registry import create_runner


def rerun_capture(fn):
    out = fn()
    return (lambda: out.copy_(fn())), out


def test_buckets():
    assert [bucket_for(n) for n in (1, 2, 3, 5, 9, 17, 33, 64)] == [1, 2, 4, 8, 16, 32, 64, 64]
    assert bucket_for(BUCKETS[-1] + 1) is None
    assert [kv_bucket_for(n) for n in (1, KV_BUCKET_MIN, KV_BUCKET_MIN + 1, 3000)] == [1024, 1024, 2048, 4096]


def _setup(ckpt, capture=rerun_capture):
    runner = create_runner("torch", checkpoint_dir=ckpt)
    model, cfg = runner.model, runner.config
    runner.reserve_kv(64 << 20)
    graphs = DecoderGraphs(model.decode_paged, runner.pool, cfg.canvas_length, cfg.hidden_size, model.dtype,
                           runner.device, capture=capture)
    return runner, graphs


def test_one_capture_per_bucket_whatever_joins_leaves_and_commits(small_ckpt):
    runner, graphs = _setup(small_ckpt)
    model, cfg = runner.model, runner.config
    g = torch.Generator().manual_seed(0)
    caches = [runner.new_cache(400) for _ in range(3)]
    runner.prefill([torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in (4, 90, 200)], caches)
    canvas = torch.randint(0, cfg.vocab_size, (3, cfg.canvas_length), generator=g)
    soft = torch.randn(3, cfg.canvas_length, cfg.hidden_size, generator=g)

    def check(rows, with_soft=True):
        got = graphs.decode(canvas[rows], soft[rows] if with_soft else None, [caches[r] for r in rows])
        want = model.decode(canvas[rows], soft[rows] if with_soft else None, [caches[r] for r in rows])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    check([0, 1, 2])  # bucket 4: captured
    assert graphs.captures == 1
    check([0, 1, 2], with_soft=False)  # replayed; no self-conditioning input means zeros
    runner.prefill([torch.tensor([5, 6])], caches[:1])  # a commit: lengths change, the graph stays
    check([0, 1, 2])
    check([2, 0, 1])  # another order of the same requests
    assert graphs.captures == 1 and graphs.replays == 4
    check([1])  # bucket 1: a second capture
    fresh = runner.new_cache(400)  # a request joins in a freed request's place
    caches[1].release()
    runner.prefill([torch.randint(0, cfg.vocab_size, (30,), generator=g)], [fresh])
    caches[1] = fresh
    check([0, 1, 2])
    assert graphs.captures == 2 and graphs.replays == 6


def test_the_graph_holds_every_buffer_it_reads(small_ckpt):
    runner, graphs = _setup(small_ckpt)
    cfg = runner.config
    caches = [runner.new_cache(100)]
    runner.prefill([torch.tensor([2, 3, 4])], caches)
    graphs.decode(torch.zeros(1, cfg.canvas_length, dtype=torch.long), None, caches)
    (key, graph), = graphs._graphs.items()
    assert key == (1, KV_BUCKET_MIN)  # no cache identity, length or address in the key
    pool = runner.pool
    held = {id(t) for t in graph.buffers}
    assert {id(t) for t in (*pool.k, *pool.v, graph.canvas, graph.soft, graph.table, graph.lengths)} <= held
    del caches
    gc.collect()  # the requests are gone; what the graph reads is not
    assert all(t.data_ptr() for t in graph.buffers)


def test_a_failed_capture_runs_that_bucket_eagerly(small_ckpt):
    def broken(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    runner, graphs = _setup(small_ckpt, broken)
    model, cfg = runner.model, runner.config
    caches = [runner.new_cache(80)]
    runner.prefill([torch.tensor([2, 3])], caches)
    canvas = torch.zeros(1, cfg.canvas_length, dtype=torch.long)
    for _ in range(3):
        torch.testing.assert_close(graphs.decode(canvas, None, caches), model.decode(canvas, None, caches),
                                   rtol=1e-4, atol=1e-4)
    assert graphs.captures == 0 and 1 in graphs._eager_buckets
