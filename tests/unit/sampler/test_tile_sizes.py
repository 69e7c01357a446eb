"""Tile sizes: a growing tile against fixed ones, padding, the default tile from a memory figure, and the
bytes a tile holds (`tile_bytes`, which admission counts)."""

import pytest
import torch

from benchmarks.step_memory import LiveBytes
from benchmarks.step_trace import H100_MEMORY
from service.sampler import ops, tiles
from service.sampler.scoring import score_rows

T = ops.temperature(3, 8, 0.4, 0.8)


def _vocab(hidden: int, vocab: int, seen: list | None = None) -> tiles.Vocab:
    """A toy tied vocabulary; `seen` collects (which, rows) of every call."""
    w = torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(0))

    def logits(h: torch.Tensor) -> torch.Tensor:
        if seen is not None:
            seen.append(("logits", h.shape[0]))
        return torch.nn.functional.linear(h, w).float()

    def soft(p: torch.Tensor) -> torch.Tensor:
        if seen is not None:
            seen.append(("soft", p.shape[0]))
        return p @ w

    return tiles.Vocab(logits, soft)


def _mixed_draws(reference: bool, length: int, vocab: int) -> list[tiles.CanvasDraw]:
    """Four canvases: plain, top_k with log-probs, greedy, and token classes."""
    classes = torch.zeros(length, dtype=torch.long)
    classes[2] = 1
    kw = [{}, {"top_k": 7, "logprobs": 3}, {"greedy": True, "logprobs": 0}, {"class_ids": classes}]
    return [tiles.CanvasDraw(T, torch.Generator().manual_seed(i), reference, **k) for i, k in enumerate(kw)]


@pytest.mark.parametrize("reference", [True, False])
def test_a_growing_tile_gives_the_fixed_tiles_results(reference):
    length, v = 24, 500
    vocab = _vocab(16, v)
    hidden = torch.randn(4, length, 16, generator=torch.Generator().manual_seed(1))
    masks = torch.ones(2, v, dtype=torch.bool)
    masks[1, 50:] = False
    fixed_draws = _mixed_draws(reference, length, v)
    fixed = tiles.sample_step(vocab, hidden, fixed_draws, length, masks)  # one canvas per tile, as on a CPU
    for tile in (40, 1000):  # tiles across canvases with a short last one; one tile for the whole step
        draws = _mixed_draws(reference, length, v)
        grown = tiles.sample_step(vocab, hidden, draws, tile, masks, fixed_tile=False)
        assert torch.equal(grown.argmax, fixed.argmax) and torch.equal(grown.sampled, fixed.sampled), tile
        assert torch.allclose(grown.entropy, fixed.entropy, atol=1e-5)
        assert torch.allclose(grown.soft, fixed.soft, atol=1e-5)
        for a, b in zip(grown.logprobs, fixed.logprobs):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.allclose(a.chosen, b.chosen, atol=1e-5) and torch.allclose(a.top, b.top, atol=1e-5)
                assert torch.equal(a.top_ids, b.top_ids)
        for x, y in zip(draws, fixed_draws):  # every generator drew as much
            assert torch.equal(torch.rand(3, generator=x.generator), torch.rand(3, generator=y.generator))
        fixed_draws = _mixed_draws(reference, length, v)
        fixed = tiles.sample_step(vocab, hidden, fixed_draws, length, masks)


def test_fixed_tiles_pad_and_growing_tiles_do_not():
    hidden = torch.randn(3, 20, 8, generator=torch.Generator().manual_seed(2))  # 60 rows
    draws = [tiles.CanvasDraw(T, torch.Generator().manual_seed(i), False) for i in range(3)]
    for tile, fixed, rows in ((13, True, [13] * 5), (13, False, [13, 13, 13, 13, 8]), (256, False, [60]),
                              (256, True, [256])):
        seen: list = []
        tiles.sample_step(_vocab(8, 300, seen), hidden, draws, tile, fixed_tile=fixed)
        assert [r for which, r in seen if which == "logits"] == rows, (tile, fixed)
        assert [r for which, r in seen if which == "soft"] == rows, (tile, fixed)
    ids = torch.zeros(3, 20, dtype=torch.long)
    for fixed, rows in ((True, [256]), (False, [60])):  # scoring tiles: the same rule
        seen = []
        score_rows(_vocab(8, 300, seen), hidden, ids, [0, 2, 1], 256, fixed_tile=fixed)
        assert [r for _, r in seen] == rows
    vocab = _vocab(8, 300)
    a = score_rows(vocab, hidden, ids, [0, 2, 1], 20)
    b = score_rows(vocab, hidden, ids, [0, 2, 1], 256, fixed_tile=False)
    for x, y in zip(a, b):
        assert torch.allclose(x.target, y.target, atol=1e-5) and torch.equal(x.top_ids, y.top_ids)


def test_the_default_tile_from_a_memory_figure():
    length, v = 256, 262_144
    assert tiles.tile_rows_for(length, v) == length  # no device memory (a CPU, meta): one canvas
    budget = tiles.TILE_MEMORY_FRACTION * H100_MEMORY
    rows = tiles.tile_rows_for(length, v, H100_MEMORY)
    assert rows > length and rows % length == 0  # several whole canvases
    assert tiles.tile_bytes(rows, v) <= budget < tiles.tile_bytes(rows + length, v)  # as many as fit
    assert tiles.tile_rows_for(length, v, H100_MEMORY, grow=False) == length  # the fixed tile: one canvas
    assert tiles.tile_rows_for(length, v, 2 * H100_MEMORY) >= 2 * rows - length  # scales with the memory
    small = 8 << 30  # a card where not even one canvas fits the budget: the canvas halved until it does
    tile = tiles.tile_rows_for(length, v, small)
    assert tile < length and length % tile == 0
    assert tiles.tile_bytes(tile, v) <= tiles.TILE_MEMORY_FRACTION * small < tiles.tile_bytes(2 * tile, v)
    assert tiles.tile_rows_for(length, v, 1 << 20) == 16  # the floor


def test_step_tile_rows():
    assert tiles.step_tile_rows(512, 100, fixed_tile=True) == 512
    assert tiles.step_tile_rows(512, 100, fixed_tile=False) == 100
    assert tiles.step_tile_rows(512, 1000, fixed_tile=False) == 512


@pytest.mark.parametrize("tile,fixed", [(64, True), (100, False), (1000, False)])
def test_a_tile_holds_at_most_tile_bytes(tile, fixed):
    """Measured: the most bytes the step's tensors hold at once, against tile_bytes of the step's tile. The worst
    cases: the reference draw under a top_k near V (its 64-row chunk), the fast one with log-probs."""
    v, h, length, b = 2048, 8, 64, 3
    vocab = _vocab(h, v)
    hidden = torch.randn(b, length, h, generator=torch.Generator().manual_seed(3))
    classes = torch.ones(length, dtype=torch.long)
    masks = torch.ones(2, v, dtype=torch.bool)
    masks[1, 1000:] = False
    cases = {"fast": {}, "reference": {"reference": True}, "reference_top_k": {"reference": True, "top_k": v - 1},
             "fast_top_k_logprobs": {"top_k": v - 1, "logprobs": 20}, "classes": {"class_ids": classes}}
    rows = tiles.step_tile_rows(tile, b * length, fixed)
    row_sized = b * length * 1024  # [N, H], [N, K] and [N] tensors (the step's outputs): not tile_bytes's
    for name, kw in cases.items():
        kw = {"reference": False, **kw}
        draws = [tiles.CanvasDraw(T, torch.Generator().manual_seed(i), **kw) for i in range(b)]
        with LiveBytes() as live:
            tiles.sample_step(vocab, hidden, draws, tile, masks, fixed_tile=fixed)
        assert 8 * rows * v <= live.peak <= tiles.tile_bytes(rows, v) + row_sized, (name, live.peak)
