"""The routed experts over a batch of sequences: shared GEMMs, each row with its own sequence's bits."""

import pytest
import torch

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
