"""The routed experts over a batch of sequences (shared GEMMs, each row with its own sequence's bits); decoder attention
without repeated or concatenated K/V."""

import pytest
import torch
import torch.nn.functional as F

from service.model.layers import grouped_linear
from service.model.loading import load_model


@pytest.fixture(scope="module")
def experts(small_ckpt):
    _, model = load_model(small_ckpt)
    return model.layers[0].experts


def least_rows(experts) -> int:
    least = experts.min_shared_rows()
    if least is None:
        pytest.skip("this machine's GEMMs round every row count differently: experts run per sequence")
    return least


def routing(seqs: int, seq_len: int, experts: int, k: int, g: torch.Generator) -> torch.Tensor:
    """idx [seqs * seq_len, k]: sequence 0 sends only a few tokens to expert 0 (a small group), the
    others route at random; every token's k experts are distinct."""
    idx = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(seqs * seq_len)])
    first = idx[:seq_len]
    first[first == 0] = experts - 1  # drop expert 0 from sequence 0 ...
    first[:2, 0] = 0  # ... but for two tokens
    return idx


def test_measured_invariant_row_count_holds_for_other_counts(experts):
    least = least_rows(experts)
    w = experts.gate_up_proj[:1]  # [1, out, in]
    x = torch.randn(700, w.shape[2], generator=torch.Generator().manual_seed(3))
    full = grouped_linear(x, w, torch.tensor([700], dtype=torch.int32))
    for m in (least, least + 1, 97, 450):
        assert torch.equal(grouped_linear(x[:m], w, torch.tensor([m], dtype=torch.int32)), full[:m])


def test_batched_experts_give_each_sequence_its_solo_bits_and_share_gemms(experts):
    least_rows(experts)
    g = torch.Generator().manual_seed(0)
    seqs, seq_len, k = 4, 64, 2
    e, hidden = experts.gate_up_proj.shape[0], experts.gate_up_proj.shape[2]
    x = torch.randn(seqs * seq_len, hidden, generator=g)
    idx = routing(seqs, seq_len, e, k, g)
    w = torch.rand(seqs * seq_len, k, generator=g)
    with torch.no_grad():
        batched = experts(x, w, idx, seq_len)
        solo = [experts(x[s * seq_len:(s + 1) * seq_len], w[s * seq_len:(s + 1) * seq_len],
                        idx[s * seq_len:(s + 1) * seq_len], seq_len) for s in range(seqs)]
    assert torch.equal(batched, torch.cat(solo))
    calls = experts._calls(idx.reshape(-1), k, seq_len)
    shared, *alone = calls
    assert len(set((shared // (seq_len * k)).tolist())) == seqs  # one GEMM call spans every sequence
    assert len(alone) == 1 and bool((alone[0] < seq_len * k).all())  # sequence 0's small group runs alone
    assert sorted(torch.cat(calls).tolist()) == list(range(seqs * seq_len * k))


def test_training_path_is_one_call(experts):
    idx = torch.zeros(10, 2, dtype=torch.long)
    assert len(experts._calls(idx.reshape(-1), 2, None)) == 1


def count_projections(monkeypatch, experts) -> list[str]:
    """Every grouped GEMM `experts` makes from now on, by projection name."""
    seen: list[str] = []
    real = type(experts).project
    monkeypatch.setattr(type(experts), "project", lambda self, x, which, offs: seen.append(which) or real(
        self, x, which, offs))
    return seen


def test_throughput_path_is_one_gemm_per_projection_for_the_whole_batch(experts, monkeypatch):
    """Default path: all sequences' tokens in one grouped GEMM per projection; each row within float tolerance of
    its per-sequence pass (exact bits are the batch-invariant mode's promise, not this one's)."""
    g = torch.Generator().manual_seed(1)
    seqs, seq_len, k = 4, 64, 2
    e, hidden = experts.gate_up_proj.shape[0], experts.gate_up_proj.shape[2]
    x = torch.randn(seqs * seq_len, hidden, generator=g)  # [S*L, H]
    idx = routing(seqs, seq_len, e, k, g)  # [S*L, K]
    w = torch.rand(seqs * seq_len, k, generator=g)
    seen = count_projections(monkeypatch, experts)
    with torch.no_grad():
        shared = experts(x, w, idx)
        assert seen == ["gate_up_proj", "down_proj"]
        solo = torch.cat([experts(x[s * seq_len:(s + 1) * seq_len], w[s * seq_len:(s + 1) * seq_len],
                                  idx[s * seq_len:(s + 1) * seq_len], seq_len) for s in range(seqs)])
    torch.testing.assert_close(shared, solo, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("invariant", [False, True])
def test_decoder_pass_batched_against_solo_by_mode(small_ckpt, invariant, monkeypatch):
    """A whole decoder pass over 3 canvases: the throughput mode makes 2 expert GEMMs per layer whatever the
    batch, the batch-invariant mode more; both match each canvas alone within tolerance (the experts' exact
    bits in the batch-invariant mode: test_batched_experts_give_each_sequence_its_solo_bits_and_share_gemms)."""
    _, model = load_model(small_ckpt, dtype="float32")
    model.batch_invariant = invariant
    cfg = model.cfg
    g = torch.Generator().manual_seed(2)
    canvas = torch.randint(3, cfg.vocab_size, (3, cfg.canvas_length), generator=g)  # [B, L]
    prompts = [torch.randint(3, cfg.vocab_size, (1, n), generator=g) for n in (5, 9, 14)]
    caches = [model.new_cache(n.shape[1] + cfg.canvas_length) for n in prompts]
    for p, c in zip(prompts, caches):
        model.encode(p, [p.shape[1]], [c])
    seen = count_projections(monkeypatch, model.layers[0].experts)
    batched = model.decode(canvas, None, caches)  # [B, L, H]
    per_layer = len(seen) / cfg.num_layers
    assert per_layer == 2 if not invariant else per_layer >= 2
    solo = torch.cat([model.decode(canvas[b:b + 1], None, [caches[b]]) for b in range(3)])
    torch.testing.assert_close(batched, solo, rtol=1e-4, atol=1e-4)


def test_unmasked_attention_past_head_dim_256_folds_query_groups_instead_of_repeating_kv():
    from service.model.layers import _attend_folded

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 16, 8, 512, generator=g)  # [B, Hq, Tq, D]: a global layer's shape, 2 KV heads
    k, v = torch.randn(2, 2, 2, 21, 512, generator=g)  # [B, Hkv, Tk, D] each
    repeated = F.scaled_dot_product_attention(q, k.repeat_interleave(8, 1), v.repeat_interleave(8, 1), scale=1.0)
    out = _attend_folded(q, k, v, 8)
    assert out.shape == (2, 8, 16 * 512)
    torch.testing.assert_close(out, repeated.transpose(1, 2).reshape(2, 8, -1))  # bit-equal on this CPU


def _one_layer_config():
    from service.model.config import LayerSpec, ModelConfig

    spec = LayerSpec(sliding=True, head_dim=4, num_kv_heads=2, rope_theta=1e4, rope_type="default",
                     partial_rotary_factor=1.0, rope_factor=1.0)
    return ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_experts=2,
                       top_k_experts=1, moe_intermediate_size=4, sliding_window=8, rms_norm_eps=1e-6,
                       final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh", canvas_length=3,
                       layers=(spec,))


def test_both_cache_layouts_put_the_canvas_after_the_visible_prefix_and_leave_the_length():
    from service.model.cache import KVCache, PagedCache
    from service.model.kv_pool import BLOCK, KVPool

    cfg = _one_layer_config()
    pool = KVPool(cfg, 8, torch.float32, torch.device("cpu"))
    paged = PagedCache(pool, pool.allocate(2), 0, [], None)  # 2 * BLOCK positions, blocks 1 and 2
    contiguous = KVCache(cfg, 4, torch.float32, torch.device("cpu"))
    prefix = torch.randn(2, 2, 4, 4)
    k, v = torch.randn(2, 2, 3, 4)
    for cache in (contiguous, paged):
        cache.write(0, 0, prefix[0], prefix[1])
        cache.length = 4
        cache.write(0, 4, k, v)  # the contiguous cache grows past its capacity of 4
        keys, values = cache.read(0, 1, 7)
        assert cache.length == 4 and keys.shape == values.shape == (1, 2, 6, 4)
        assert torch.equal(keys[0], torch.cat([prefix[0][:, 1:4], k], dim=1))
        assert torch.equal(values[0], torch.cat([prefix[1][:, 1:4], v], dim=1))
    assert paged.table.tolist() == [1, 2] and torch.equal(pool.k[0][:, BLOCK : BLOCK + 7], contiguous.k[0][:, :7])
