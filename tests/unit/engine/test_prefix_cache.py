"""The prefix cache on the embedded model: a shared prompt prefix is encoded once, and every output is the same
token for token as without the cache (the reference sampler, same seeds) for generate, infill and edit requests;
eviction under a tiny budget; a concurrent burst sharing one prefix; blocks all come back."""

import pytest
import torch

from service import DEFAULT_CHECKPOINT
from service.engine.api import FinalEvent, Request
from service.engine.registry import create_engine
from service.engine.scheduler import Limits
from service.errors import Unavailable
from service.model.cache import PagedCache
from service.model.kv_pool import BLOCK, KVPool
from service.request.layout import edit_layout, infill_layout
from service.sampler.params import GenerationParams, Pins

CHUNK = 64
DOC = " ".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(20))  # a shared ~300-token prefix


def _engine(prefix_bytes: int, **kw):
    return create_engine("torch", checkpoint_dir=DEFAULT_CHECKPOINT, prefix_cache_bytes=prefix_bytes,
                         prefix_chunk=CHUNK, **kw)


def _params(max_new_tokens: int) -> GenerationParams:
    return GenerationParams(max_new_tokens=max_new_tokens, max_denoising_steps=6, sampler="reference")


def _requests(engine) -> list[Request]:
    tok, cfg = engine.tokenizer, engine.config
    length = cfg.canvas_length
    out = []
    for i, question in enumerate(("\n# what does f3 return?", "\n# and f11?")):
        ids = tok.encode(DOC + question, add_bos=True)
        out.append(Request(ids, _params(length if i else 2 * length), seed=i))
    for lay in (infill_layout(tok, length, DOC + "\ndef g(y):\n", "\n    return z\n", 12),
                edit_layout(tok, length, "value = f2(3)", [(8, 10, 0)], instruction=DOC, eos_id=engine.eos_ids[0],
                            pad_id=engine.pad_id)):
        out.append(Request(lay.prompt_ids, _params(lay.max_new_tokens), seed=7,
                           pins=Pins.from_lists(lay.pin_ids, lay.pin_mask), constraints=lay.constraint_ids))
    assert all(len(r.prompt_ids) > 2 * CHUNK for r in out)
    return out


def _final(engine, request: Request) -> FinalEvent:
    final = list(engine.generate(request))[-1]
    assert isinstance(final, FinalEvent)
    return final


def _all_blocks_back(engine) -> bool:
    pool = engine.runner.pool
    cached = sum(len(c.blocks) for c in pool._chunks.values())
    return pool.blocks_in_use() == 0 and len(pool._free) + cached == pool.num_blocks - 1


def test_cache_on_equals_cache_off_for_generate_infill_and_edit():
    off, on = _engine(0), _engine(64 << 20)
    requests = _requests(on)
    want = [_final(off, r) for r in requests]
    cold = [_final(on, r) for r in requests]  # the first request fills the cache; the others share its chunks
    warm = [_final(on, r) for r in requests]  # every prompt's full chunks are cached now
    for w, c, h, r in zip(want, cold, warm, requests):
        assert c.token_ids == w.token_ids and h.token_ids == w.token_ids
        assert w.stats.cached_prompt_tokens == 0
        assert h.stats.cached_prompt_tokens == len(r.prompt_ids) // CHUNK * CHUNK
    assert cold[0].stats.cached_prompt_tokens == 0 and cold[1].stats.cached_prompt_tokens >= 4 * CHUNK
    stats = on.runner.prefix_stats()
    assert stats["tokens_reused"] > 0.5 * stats["tokens_queried"] and stats["bytes"] > 0
    assert off.runner.prefix_stats()["tokens_reused"] == 0
    assert _all_blocks_back(on) and _all_blocks_back(off)


def test_eviction_under_a_tiny_budget_keeps_outputs_and_the_bound():
    off = _engine(0)
    probe = off.runner.pool
    chunk_bytes = CHUNK // BLOCK * probe.block_bytes()
    tiny = _engine(2 * chunk_bytes)  # two chunks: less than one prompt's
    for r in _requests(tiny)[:2]:
        assert _final(tiny, r).token_ids == _final(off, r).token_ids
        assert tiny.runner.pool.cached_bytes() <= 2 * chunk_bytes  # idle chunks past the bound are gone
    assert tiny.runner.prefix_stats()["evictions"] > 0
    assert _all_blocks_back(tiny)


def test_a_concurrent_burst_shares_one_prefix():
    limits = Limits(max_live_canvases=8)
    off, on = _engine(0, batch_invariant=True), _engine(64 << 20, limits=limits, batch_invariant=True)
    tok = on.tokenizer
    burst = [Request(tok.encode(DOC + f"\n# f{i}?", add_bos=True), _params(on.config.canvas_length), seed=i)
             for i in range(6)]
    on.scheduler.start()
    try:
        streams = [on.scheduler.submit(r) for r in burst]
        got = [list(s)[-1] for s in streams]
    finally:
        on.scheduler.stop()
    for r, g in zip(burst, got):
        assert g.token_ids == _final(off, r).token_ids  # batch-invariant: each equals its solo run without a cache
    assert got[0].stats.cached_prompt_tokens == 0
    assert all(g.stats.cached_prompt_tokens >= 4 * CHUNK for g in got[1:])  # encoded once, in the same step
    assert _all_blocks_back(on)


def test_chunks_in_use_are_never_evicted_and_a_full_pool_says_so():
    engine = _engine(64 << 20)
    cfg, runner = engine.config, engine.runner
    pool = KVPool(cfg, 1 + 3 * CHUNK // BLOCK, torch.float32, torch.device("cpu"), prefix_bytes=1 << 30, chunk=CHUNK)
    prompt = list(range(3, 3 + 2 * CHUNK))
    hashes, shared = pool.match(prompt)
    assert shared == []
    first = PagedCache(pool, pool.allocate(2 * CHUNK // BLOCK), 0, hashes, prompt)
    first.length = len(prompt)
    first.publish()  # both chunks cached, used by `first`
    hashes, shared = pool.match(prompt)
    second = PagedCache(pool, shared + pool.allocate(1), len(shared) * BLOCK, hashes, prompt)
    assert second.reused == 2 * CHUNK and second.blocks[: len(shared)] == first.blocks[: len(shared)]
    assert pool.blocks_in_use() == 2 * CHUNK // BLOCK + 1  # the shared chunks' blocks count once, and second's own
    first.release()
    with pytest.raises(Unavailable, match="KV pool is full"):  # `second` still uses both chunks
        pool.allocate(CHUNK // BLOCK + 1)
    second.release()
    second.release()  # idempotent
    assert pool.blocks_in_use() == 0 and pool.cached_bytes() == 2 * CHUNK // BLOCK * pool.block_bytes()
    assert len(pool.allocate(3 * CHUNK // BLOCK)) == 3 * CHUNK // BLOCK  # idle chunks evicted to make room
    assert pool.stats.evictions == 2 and pool.cached_bytes() == 0
    del runner


@pytest.mark.parametrize("kw, field", [({"prefix_cache_bytes": -1}, "prefix_cache_bytes"),
                                       ({"prefix_cache_bytes": 1.5}, "prefix_cache_bytes"),
                                       ({"prefix_chunk": 8}, "prefix_chunk"), ({"prefix_chunk": 100}, "prefix_chunk")])
def test_bad_prefix_settings_name_the_field(kw, field):
    from service.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as e:
        create_engine("torch", checkpoint_dir=DEFAULT_CHECKPOINT, **kw)
    assert e.value.field == field
