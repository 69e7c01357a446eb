"""The step's vocabulary work in tiles: exact draws, the fast sampler's distribution, tile shapes."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from service.sampler import ops, tiles
from service.sampler.constraints import constrain_logits


# chi-square critical value at p = 0.001 for k - 1 degrees of freedom (Wilson-Hilferty approximation)
def chi2_critical(dof: int, z: float = 3.09) -> float:
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def chi_square(ids: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson's statistic of observed ids against probs [V], pooling ids expected under min_expected."""
    n = ids.numel()
    observed = torch.bincount(ids, minlength=probs.numel()).double()
    expected = probs.double() * n
    big = expected >= min_expected
    obs = torch.cat([observed[big], observed[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    assert float(observed[expected == 0].sum()) == 0, "drew an id of probability 0"
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return stat, int(keep.sum()) - 1


def fast_draws(probs_row: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    probs = probs_row[None].expand(n, -1)
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed))
    return tiles.inverse_cdf_draw(probs, u)


@pytest.mark.parametrize("vocab", [7, 300, 1000])  # below, above and not a multiple of the block width
def test_fast_sampler_frequencies_match_the_softmax(vocab):
    logits = 2.5 * torch.randn(vocab, generator=torch.Generator().manual_seed(vocab))
    probs = torch.softmax(logits, dim=-1)
    ids = fast_draws(probs, 40_000)
    stat, dof = chi_square(ids, probs)
    assert stat < chi2_critical(dof), (stat, dof)
    # the bound has teeth: the same draws judged against a slightly other distribution fail it
    other = torch.softmax(logits / 1.15, dim=-1)
    wrong, wdof = chi_square(ids, other)
    assert wrong > chi2_critical(wdof), (wrong, wdof)


def test_a_wrong_sampler_fails_the_chi_square_bound():
    probs = torch.softmax(2.5 * torch.randn(300, generator=torch.Generator().manual_seed(5)), dim=-1)
    n = 40_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(1))
    off_by_one = torch.searchsorted(probs.cumsum(-1), u[:, None]).squeeze(-1).clamp(max=298) + 1  # shifted ids
    stat, dof = chi_square(off_by_one, probs)
    assert stat > chi2_critical(dof)


def test_fast_sampler_never_draws_a_blocked_id():
    logits = torch.randn(6, 700, generator=torch.Generator().manual_seed(2))
    allowed = torch.rand(6, 700, generator=torch.Generator().manual_seed(3)) < 0.01
    allowed[:, 699] = True  # the last id of the last (partial) block
    probs = torch.softmax(torch.where(allowed, logits, torch.finfo(torch.float32).min), dim=-1)
    for s in range(30):
        ids = tiles.inverse_cdf_draw(probs, torch.rand(6, generator=torch.Generator().manual_seed(s)))
        assert bool(allowed.gather(1, ids[:, None]).all())
    edge = tiles.inverse_cdf_draw(probs, torch.full((6,), 1.0 - 2**-24))  # u at the top of [0, 1)
    assert bool(allowed.gather(1, edge[:, None]).all())


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 40), st.integers(2, 3000), st.floats(0.1, 8.0), st.integers(0, 2**32), st.integers(1, 40))
def test_reference_draw_is_multinomials_stream_in_chunks(length, vocab, scale, seed, chunk):
    probs = torch.softmax(scale * torch.randn(length, vocab, generator=torch.Generator().manual_seed(seed)), dim=-1)
    ours, ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    ids = torch.cat([tiles.reference_draw(probs[i : i + chunk], ours) for i in range(0, length, chunk)])
    assert torch.equal(ids, torch.multinomial(probs, num_samples=1, generator=ref).squeeze(-1))
    assert torch.equal(torch.rand(4, generator=ours), torch.rand(4, generator=ref))  # same stream position


def _vocab(hidden: int, vocab: int, seed: int = 0) -> tuple[tiles.Vocab, torch.Tensor]:
    w = torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(seed))
    return tiles.Vocab(lambda h: torch.nn.functional.linear(h, w).float(), lambda p: p @ w), w


def _draws(n: int, reference: bool, classes: torch.Tensor | None = None) -> list[tiles.CanvasDraw]:
    return [tiles.CanvasDraw(ops.temperature(3, 8, 0.4, 0.8), torch.Generator().manual_seed(i), reference, classes)
            for i in range(n)]


@pytest.mark.parametrize("reference", [True, False])
def test_a_step_in_tiles_equals_each_canvas_alone(reference):
    vocab, w = _vocab(16, 500)
    hidden = torch.randn(3, 150, 16, generator=torch.Generator().manual_seed(9))  # 150 rows: 64-row draw chunks
    batched = tiles.sample_step(vocab, hidden, _draws(3, reference), tile=150)
    for b in range(3):
        alone = tiles.sample_step(vocab, hidden[b : b + 1], _draws(3, reference)[b : b + 1], tile=150)
        for name in ("entropy", "argmax", "sampled", "soft"):
            assert torch.equal(getattr(batched, name)[b], getattr(alone, name)[0]), (name, b)
    # against the plain whole-canvas computation (the pre-tile code path)
    processed = torch.nn.functional.linear(hidden[0], w).div_(ops.temperature(3, 8, 0.4, 0.8))
    expected_h = ops.token_entropy(processed) if reference else ops.fast_probs_and_entropy(processed)[1]
    assert torch.equal(batched.entropy[0], expected_h)
    assert torch.equal(batched.argmax[0], processed.argmax(-1))
    if reference:
        g = torch.Generator().manual_seed(0)
        assert torch.equal(batched.sampled[0], torch.multinomial(torch.softmax(processed, -1), 1, generator=g)[:, 0])


def test_tiles_that_cross_canvases_and_a_padded_last_tile():
    vocab, w = _vocab(16, 300)
    hidden = torch.randn(3, 20, 16, generator=torch.Generator().manual_seed(4))
    classes = torch.zeros(20, dtype=torch.long)
    classes[3] = 1
    masks = torch.ones(2, 300, dtype=torch.bool)
    masks[1, 100:] = False
    draws = _draws(3, True, classes)
    out = tiles.sample_step(vocab, hidden, draws, tile=13, class_masks=masks)  # 60 rows: 4 full tiles + 8 padded
    assert out.entropy.shape == (3, 20) and out.soft.shape == (3, 20, 16)
    assert bool((out.argmax[:, 3] < 100).all()) and bool((out.sampled[:, 3] < 100).all())
    # every canvas consumed exactly 20 * 300 uniforms for its draws, in row order
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        torch.rand(20, 300, generator=g, dtype=torch.float64)
        assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=draws[i].generator))
    processed = torch.nn.functional.linear(hidden[1], w).div_(ops.temperature(3, 8, 0.4, 0.8))
    assert torch.allclose(out.entropy[1], ops.token_entropy(constrain_logits(processed, classes, masks)), atol=1e-5)


def test_row_chunks_of_the_reference_entropy_keep_its_bits():
    logits = 4 * torch.randn(256, 3000, generator=torch.Generator().manual_seed(8))
    whole = ops.token_entropy(logits)
    for step in (1, 7, 64):
        assert torch.equal(torch.cat([ops.token_entropy(logits[i : i + step]) for i in range(0, 256, step)]), whole)


def test_default_tile_is_one_canvas_on_a_cpu():
    assert tiles.tile_rows_for(256, 262_144) == tiles.tile_rows_for(256, 262_144, None) == 256


def _draw(reference: bool, seed: int = 0, **kw) -> tiles.CanvasDraw:
    return tiles.CanvasDraw(ops.temperature(3, 8, 0.4, 0.8), torch.Generator().manual_seed(seed), reference, **kw)


@pytest.mark.parametrize("reference", [True, False])
def test_greedy_candidates_are_the_argmax_and_draw_nothing(reference):
    vocab, _ = _vocab(16, 500)
    hidden = torch.randn(2, 70, 16, generator=torch.Generator().manual_seed(3))
    sampling = tiles.sample_step(vocab, hidden, [_draw(reference, 0), _draw(reference, 1)], tile=70)
    greedy_draws = [_draw(reference, 0, greedy=True), _draw(reference, 7, greedy=True)]
    greedy = tiles.sample_step(vocab, hidden, greedy_draws, tile=70)
    assert torch.equal(greedy.sampled, greedy.argmax)
    assert not torch.equal(sampling.sampled, sampling.argmax)  # a sampled step's candidates are not all argmax
    # the rest of the step is the sampled step's, bit for bit: acceptance and self-conditioning unchanged
    for name in ("entropy", "argmax", "soft"):
        assert torch.equal(getattr(greedy, name), getattr(sampling, name)), name
    # no random numbers drawn: each generator is where its seed left it
    for d, seed in zip(greedy_draws, (0, 7)):
        fresh = torch.Generator().manual_seed(seed)
        assert torch.equal(torch.rand(3, generator=d.generator), torch.rand(3, generator=fresh))


@pytest.mark.parametrize("reference", [True, False])
def test_top_k_1_draws_the_argmax_and_leaves_entropy_alone(reference):
    vocab, _ = _vocab(16, 500)
    hidden = torch.randn(1, 150, 16, generator=torch.Generator().manual_seed(4))
    plain = tiles.sample_step(vocab, hidden, [_draw(reference)], tile=150)
    top1 = tiles.sample_step(vocab, hidden, [_draw(reference, top_k=1)], tile=150)
    assert torch.equal(top1.sampled, top1.argmax) and not torch.equal(plain.sampled, plain.argmax)
    for name in ("entropy", "argmax", "soft"):
        assert torch.equal(getattr(top1, name), getattr(plain, name)), name
    # top_k at or past the vocabulary is no filter: the same draws as none
    whole = tiles.sample_step(vocab, hidden, [_draw(reference, top_k=500)], tile=150)
    assert torch.equal(whole.sampled, plain.sampled)


def test_top_k_draws_the_k_largest_in_proportion():
    logits = 1.5 * torch.randn(700, generator=torch.Generator().manual_seed(6))
    k, n = 20, 40_000
    probs = torch.softmax(logits, dim=-1)
    rows, probs_rows = logits[None].expand(n, -1), probs[None].expand(n, -1)
    u = torch.rand(n, generator=torch.Generator().manual_seed(1))
    ids = tiles._filtered(tiles.inverse_cdf_draw, probs_rows, rows, k, u)
    top = torch.zeros_like(probs)
    kept = logits.topk(k).indices
    top[kept] = probs[kept]
    stat, dof = chi_square(ids, top / top.sum())
    assert stat < chi2_critical(dof), (stat, dof)
    ref = tiles._filtered(tiles.reference_draw, probs_rows[:2000], rows[:2000], k, torch.Generator().manual_seed(2))
    assert bool(torch.isin(ref, kept).all()) and ref.unique().numel() > k // 2
