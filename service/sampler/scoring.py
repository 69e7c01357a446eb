"""A scoring canvas's vocabulary work: the log-probability of given ids at every position, in tiles.

The decoder's hidden states of the scoring canvases of a step [S, L, H] go through the unembedding and soft-cap
at temperature 1 and a log-softmax a tile of rows at a time (tiles as the sampler's: `tile` rows each, the last
padded, when fixed; else min(tile, S * L) rows, unpadded), so no [S, L, V] tensor exists. Nothing is drawn.
Shapes: S scoring canvases, L canvas length, V vocabulary, K alternatives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from service.sampler.tiles import Vocab, step_tile_rows, tiles_of


@dataclass(frozen=True)
class ScoreRows:
    """One scoring canvas's result at one step, on its device."""

    target: Tensor  # float32 [L]: log p(true id) at each position
    top: Tensor  # float32 [L, K]: the K likeliest ids' log-probs, largest first
    top_ids: Tensor  # long [L, K]


def score_rows(vocab: Vocab, hidden: Tensor, ids: Tensor, top: list[int], tile: int,
               fixed_tile: bool = True) -> list[ScoreRows]:
    """hidden [S, L, H], ids long [S, L] (the true ids), top: alternatives per canvas -> one ScoreRows per canvas."""
    s, length, h = hidden.shape
    n = s * length
    flat, flat_ids = hidden.reshape(n, h), ids.reshape(n)  # [N, H], [N]
    k = max(top) if top else 0
    target = torch.empty(n, dtype=torch.float32, device=hidden.device)
    top_lp = torch.empty(n, k, dtype=torch.float32, device=hidden.device)
    top_ids = torch.empty(n, k, dtype=torch.long, device=hidden.device)
    for start, stop, rows in tiles_of(flat, step_tile_rows(tile, n, fixed_tile), pad=fixed_tile):
        logp = torch.log_softmax(vocab.logits(rows)[: stop - start], dim=-1)  # [m, V] float32
        target[start:stop] = logp.gather(1, flat_ids[start:stop, None])[:, 0]
        if k:
            best = logp.topk(k, dim=-1)
            top_lp[start:stop], top_ids[start:stop] = best.values, best.indices
        del logp
    target, top_lp, top_ids = target.view(s, length), top_lp.view(s, length, k), top_ids.view(s, length, k)
    return [ScoreRows(target[i], top_lp[i, :, : top[i]], top_ids[i, :, : top[i]]) for i in range(s)]
