"""Log-probabilities inside the step's tiles: their values, their top-N, and that they change no draw."""

import pytest
import torch

from service.sampler import ops, tiles
from service.sampler.constraints import constrain_logits

T = ops.temperature(3, 8, 0.4, 0.8)


def _vocab(hidden: int, vocab: int, seed: int = 0) -> tuple[tiles.Vocab, torch.Tensor]:
    w = torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(seed))
    return tiles.Vocab(lambda h: torch.nn.functional.linear(h, w).float(), lambda p: p @ w), w


def _draw(reference: bool, seed: int = 0, **kw) -> tiles.CanvasDraw:
    return tiles.CanvasDraw(T, torch.Generator().manual_seed(seed), reference, **kw)


def _processed(hidden: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(hidden, w).div_(T)  # [L, V]


@pytest.mark.parametrize("reference", [True, False])
@pytest.mark.parametrize("greedy", [False, True])
def test_logprobs_are_log_softmax_of_the_processed_logits(reference, greedy):
    vocab, w = _vocab(16, 500)
    hidden = torch.randn(2, 40, 16, generator=torch.Generator().manual_seed(1))
    draws = [_draw(reference, 0, greedy=greedy, logprobs=3), _draw(reference, 1, greedy=greedy)]
    out = tiles.sample_step(vocab, hidden, draws, tile=24)  # tiles that cross the canvases
    assert out.logprobs[1] is None
    lp = out.logprobs[0]
    expected = torch.log_softmax(_processed(hidden[0], w), dim=-1)  # [L, V]
    assert torch.allclose(lp.chosen, expected.gather(1, out.argmax[0][:, None])[:, 0], atol=1e-5)
    assert torch.allclose(lp.top, expected.gather(1, lp.top_ids), atol=1e-5)
    assert lp.top.shape == lp.top_ids.shape == (40, 3)
    assert bool((lp.top[:, :-1] >= lp.top[:, 1:]).all()), "largest first"
    assert torch.equal(lp.top_ids[:, 0], out.argmax[0]) and torch.equal(lp.top[:, 0], lp.chosen)
    assert bool((lp.top <= 0).all())


@pytest.mark.parametrize("reference", [True, False])
def test_logprobs_change_no_draw(reference):
    vocab, _ = _vocab(16, 500)
    hidden = torch.randn(3, 70, 16, generator=torch.Generator().manual_seed(2))
    for kw in ({}, {"top_k": 9}, {"greedy": True}):
        off = [_draw(reference, s, **kw) for s in range(3)]
        on = [_draw(reference, s, logprobs=5 * (s != 1) - (s == 1), **kw) for s in range(3)]  # canvas 1: off
        a, b = tiles.sample_step(vocab, hidden, off, tile=64), tiles.sample_step(vocab, hidden, on, tile=64)
        for name in ("entropy", "argmax", "sampled", "soft"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (name, kw)
        assert a.logprobs is None and b.logprobs[1] is None and b.logprobs[0] is not None
        for x, y in zip(off, on):  # the generators stand at the same place
            assert torch.equal(torch.rand(3, generator=x.generator), torch.rand(3, generator=y.generator))


def test_top_k_renormalises_over_the_k_candidates():
    vocab, w = _vocab(16, 300)
    hidden = torch.randn(1, 20, 16, generator=torch.Generator().manual_seed(3))
    out = tiles.sample_step(vocab, hidden, [_draw(False, top_k=4, logprobs=20)], tile=20)
    lp = out.logprobs[0]
    assert lp.top.shape == (20, 4)  # no more alternatives than candidates
    processed = _processed(hidden[0], w)
    values, index = processed.topk(4, dim=-1)
    assert torch.equal(lp.top_ids, index)
    assert torch.allclose(lp.top, torch.log_softmax(values, dim=-1), atol=1e-5)
    assert torch.allclose(lp.top.exp().sum(-1), torch.ones(20), atol=1e-5)  # the candidates' whole mass


def test_logprobs_zero_gives_the_token_alone_and_classes_mask_the_alternatives():
    vocab, w = _vocab(16, 300)
    hidden = torch.randn(1, 10, 16, generator=torch.Generator().manual_seed(4))
    classes = torch.ones(10, dtype=torch.long)
    masks = torch.ones(2, 300, dtype=torch.bool)
    masks[1, 3:] = False  # class 1 allows 3 ids
    out = tiles.sample_step(vocab, hidden, [_draw(True, class_ids=classes, logprobs=0)], tile=10, class_masks=masks)
    assert out.logprobs[0].top.shape == (10, 0)
    expected = torch.log_softmax(constrain_logits(_processed(hidden[0], w), classes, masks), dim=-1)
    assert torch.allclose(out.logprobs[0].chosen, expected.gather(1, out.argmax[0][:, None])[:, 0], atol=1e-5)
    five = tiles.sample_step(vocab, hidden, [_draw(True, class_ids=classes, logprobs=5)], tile=10, class_masks=masks)
    assert bool((five.logprobs[0].top_ids[:, :3] < 3).all()) and bool(torch.isinf(five.logprobs[0].top[:, 3:]).all())
