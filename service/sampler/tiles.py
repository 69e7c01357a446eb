"""One denoising step's vocabulary work over a batch of canvases, in tiles of positions.

The rows of a step are the positions of every live canvas, flattened: N = B * L. They go through the
unembedding, soft-cap, temperature, token-class mask, softmax, entropy, argmax, a candidate draw and the
self-conditioning matmul `tile` rows at a time, so no [B, L, V] tensor (nor an [L, V] float64 one when
tile < L) ever exists. Every tile has exactly `tile` rows (the last is padded with zero rows): its GEMMs
have one shape whatever the batch, so a canvas's bits do not depend on what it was batched with, and
the shapes stay static for CUDA graphs. Everything stays on the hidden states' device; there is no
host sync in here.

Each canvas draws from its own generator, in row order, exactly as the reference does: the reference
sampler L * V float64 uniforms (multinomial's stream), the fast sampler one uniform per position. A
candidate id is drawn for every position; the caller keeps those the entropy bound accepts. A greedy
canvas's candidate is its argmax and draws nothing; a top_k canvas draws among its top_k logits only
(entropy and self-conditioning still see the whole distribution).

A canvas with `logprobs` set also gets, per position, the log-probability of its argmax (the id the position
commits if this step is its canvas's last) and its `logprobs` likeliest ids with theirs, under the distribution
its candidate is drawn from: log_softmax of the processed logits, over the top_k logits only when top_k is set.
Only those canvases pay for it; it draws nothing, so the ids are the same with it on or off.
Shapes: B canvases, L canvas length, V vocabulary, H hidden, T tile rows, C token classes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from service.sampler import ops
from service.sampler.constraints import FREE, constrain_logits_

# Inverse-CDF block width of the fast sampler's two-level search.
_BLOCK = 256
# Rows whose reference entropy and float64 uniforms are made at once inside a tile (row-wise work: the
# same bits as the whole tile at once, a quarter of its transient memory at a one-canvas tile).
_REFERENCE_ROWS = 64


@dataclass(frozen=True)
class Vocab:
    """The network's side of the vocabulary work."""

    logits: Callable[[Tensor], Tensor]  # hidden [M, H] -> soft-capped float32 logits [M, V]
    soft_embedding: Callable[[Tensor], Tensor]  # probs [M, V] float32 -> self-conditioning input [M, H]


@dataclass(frozen=True)
class CanvasDraw:
    """Per-canvas sampling settings of one step."""

    temperature: Tensor  # float32 scalar on the canvas's device (ops.temperature)
    generator: torch.Generator  # on the canvas's device
    reference: bool  # the reference's random stream (else the fast sampler)
    class_ids: Tensor | None = None  # long [L]: token class per position, or None (all FREE)
    greedy: bool = False  # the candidate is the argmax: no random numbers drawn
    top_k: int = 0  # candidates from the top_k largest processed logits only; 0: all
    logprobs: int = -1  # -1: off; n >= 0: the argmax's log-prob and the n likeliest ids' per position


@dataclass(frozen=True)
class StepSample:
    """What the sampler needs of a step, per canvas position: [B, L] each, [B, L, H] for soft."""

    entropy: Tensor  # float32
    argmax: Tensor  # long, of the processed logits
    sampled: Tensor  # long: a candidate draw at every position
    soft: Tensor  # the next step's self-conditioning input
    logprobs: list["StepLogprobs | None"] | None = None  # per canvas, where its draw asked (None: none did)


@dataclass(frozen=True)
class StepLogprobs:
    """One canvas's log-probabilities at one step, on its device."""

    chosen: Tensor  # float32 [L]: of each position's argmax
    top: Tensor  # float32 [L, K]: the K likeliest, largest first (K = min(logprobs, top_k or V))
    top_ids: Tensor  # long [L, K]


def tile_rows_for(canvas_length: int, vocab_size: int, device: torch.device, budget_fraction: float = 0.05) -> int:
    """The default tile: one canvas (the reference's GEMM shape, so the reference sampler stays
    bit-exact on a CPU), halved on an accelerator until the tile's buffers fit `budget_fraction` of it."""
    tile = canvas_length
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        while tile > 16 and tile * tile_bytes_per_row(vocab_size) > budget_fraction * total:
            tile //= 2
    return tile


def tile_bytes_per_row(vocab_size: int) -> int:
    """Bytes one tile row holds at most at once: logits, probs and an entropy temporary (float32 each),
    the reference's float64 uniforms and their float32 exponentials and ratio."""
    return vocab_size * (4 + 4 + 4 + 8 + 4 + 4)


def sample_step(vocab: Vocab, hidden: Tensor, draws: list[CanvasDraw], tile: int,
                class_masks: Tensor | None = None) -> StepSample:
    """hidden [B, L, H] (final-normed decoder output) -> StepSample; class_masks: bool [C, V]."""
    b, length, h = hidden.shape
    n = b * length
    flat = hidden.reshape(n, h)  # [N, H]
    dev = hidden.device
    temps = torch.stack([d.temperature for d in draws]).repeat_interleave(length)[:, None]  # [N, 1]
    class_ids = None
    if any(d.class_ids is not None for d in draws):
        free = torch.full((length,), FREE, dtype=torch.long, device=dev)
        class_ids = torch.cat([d.class_ids if d.class_ids is not None else free for d in draws])  # [N]
    # The fast sampler's uniforms: one per position, drawn per canvas before its tiles.
    fast_u = [None if d.reference or d.greedy else torch.rand(length, generator=d.generator, device=dev) for d in draws]
    entropy = torch.empty(n, dtype=torch.float32, device=dev)
    argmax = torch.empty(n, dtype=torch.long, device=dev)
    sampled = torch.empty(n, dtype=torch.long, device=dev)
    soft = torch.empty(n, h, dtype=hidden.dtype, device=dev)
    lps = [_new_logprobs(d, length, dev) for d in draws]
    for start, stop, rows in tiles_of(flat, tile):
        m = stop - start
        logits = vocab.logits(rows)[:m]  # [m, V] float32
        processed = logits.div_(temps[start:stop])
        if class_ids is not None:
            constrain_logits_(processed, class_ids[start:stop], class_masks)
        argmax[start:stop] = processed.argmax(dim=-1)
        parts = []
        for c, lo, hi in _segments(start, stop, length):  # each canvas's share of the tile, in row order
            d = draws[c]
            u = None if fast_u[c] is None else fast_u[c][lo - c * length : hi - c * length]
            probs, entropy[lo:hi], ids = _sample_rows(processed[lo - start : hi - start], d, u)
            sampled[lo:hi] = argmax[lo:hi] if ids is None else ids
            parts.append(probs)
            if lps[c] is not None:
                _record_logprobs(lps[c], lo - c * length, probs, processed[lo - start : hi - start], argmax[lo:hi],
                                 d.top_k)
        probs = parts[0] if len(parts) == 1 else torch.cat(parts)  # [m, V]
        del logits, processed, parts
        if m < tile:
            probs = torch.cat([probs, probs.new_zeros(tile - m, probs.shape[1])])
        soft[start:stop] = vocab.soft_embedding(probs)[:m]
        del probs
    return StepSample(entropy.view(b, length), argmax.view(b, length), sampled.view(b, length),
                      soft.view(b, length, h), lps if any(lp is not None for lp in lps) else None)


def tiles_of(flat: Tensor, tile: int):
    """(start, stop, rows [tile, H]) over flat [N, H], `tile` rows at a time; the last padded with zero rows (static
    tile shape)."""
    n = flat.shape[0]
    for start in range(0, n, tile):
        stop = min(n, start + tile)
        rows = flat[start:stop]
        if stop - start < tile:
            rows = torch.cat([rows, rows.new_zeros(tile - (stop - start), flat.shape[1])])
        yield start, stop, rows


def _new_logprobs(draw: CanvasDraw, length: int, device: torch.device) -> StepLogprobs | None:
    """A canvas's empty log-prob buffers, or None when its draw did not ask."""
    if draw.logprobs < 0:
        return None
    k = draw.logprobs if draw.top_k <= 0 else min(draw.logprobs, draw.top_k)
    return StepLogprobs(torch.empty(length, dtype=torch.float32, device=device),
                        torch.empty(length, k, dtype=torch.float32, device=device),
                        torch.empty(length, k, dtype=torch.long, device=device))


def _record_logprobs(out: StepLogprobs, lo: int, probs: Tensor, processed: Tensor, argmax: Tensor,
                     top_k: int) -> None:
    """Rows [lo, lo + k) of `out` from one canvas's rows of a tile: probs and processed [k, V], argmax [k].
    Log-probs under the candidate's distribution: softmax's, renormalised over the top_k ids when
    0 < top_k < V. Only [k, K] tensors are made."""
    keep = out.top.shape[1]
    hi = lo + processed.shape[0]
    chosen = probs.gather(1, argmax[:, None])  # [k, 1]
    if 0 < top_k < processed.shape[-1]:
        index = processed.topk(top_k, dim=-1).indices  # [k, top_k], largest first (as the draw's candidates)
        kept = probs.gather(1, index)  # [k, top_k]
        norm = kept.sum(dim=-1, keepdim=True).log_()  # [k, 1]
        kept, index = kept[:, :keep], index[:, :keep]
    else:
        index = processed.topk(keep, dim=-1).indices  # [k, K]
        kept, norm = probs.gather(1, index), None
    out.chosen[lo:hi] = _log(chosen, norm)[:, 0]
    out.top[lo:hi] = _log(kept, norm)
    out.top_ids[lo:hi] = index


def _log(p: Tensor, norm: Tensor | None) -> Tensor:
    """log(p) - norm ([k, n], norm [k, 1] or None: 0)."""
    return p.log() if norm is None else p.log() - norm


def _segments(start: int, stop: int, length: int):
    """(canvas index, first row, last row + 1) of each canvas's share of rows [start, stop), in order."""
    r = start
    while r < stop:
        c = r // length
        end = min(stop, (c + 1) * length)
        yield c, r, end
        r = end


def _sample_rows(processed: Tensor, draw: CanvasDraw, u: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """One canvas's rows of a tile: probs [k, V], entropy [k] and a candidate id [k] per row (None when
    greedy: the candidates are the argmax).

    The reference sampler: torch.softmax, the reference's entropy formula and multinomial's stream,
    bit for bit. The fast one: one fused log_softmax, and an inverse-CDF draw from the uniforms u [k].
    """
    if draw.reference:
        probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
        rows = [slice(i, i + _REFERENCE_ROWS) for i in range(0, processed.shape[0], _REFERENCE_ROWS)]
        parts = [(ops.token_entropy(processed[r]),  # in row order: the stream's order
                  None if draw.greedy else _filtered(reference_draw, probs[r], processed[r], draw.top_k,
                                                     draw.generator))
                 for r in rows]
        ids = None if draw.greedy else torch.cat([i for _, i in parts])
        return probs, torch.cat([h for h, _ in parts]), ids
    probs, entropy = ops.fast_probs_and_entropy(processed)
    if draw.greedy:
        return probs, entropy, None
    return probs, entropy, _filtered(inverse_cdf_draw, probs, processed, draw.top_k, u)


def _filtered(draw_fn: Callable[[Tensor, object], Tensor], probs: Tensor, processed: Tensor, k: int,
              source: object) -> Tensor:
    """draw_fn(probs, source)'s ids [m], drawn among each row's k largest processed logits only (ties broken
    as torch.topk does) when 0 < k < V. The draw runs on the k gathered probabilities (both draws are
    scale-free: no renormalisation), so no second [m, V] tensor is made."""
    weights, index = candidates(probs, processed, k)
    ids = draw_fn(weights, source)
    return ids if index is None else index.gather(1, ids[:, None])[:, 0]


def candidates(probs: Tensor, processed: Tensor, k: int) -> tuple[Tensor, Tensor | None]:
    """The weights [m, K] a candidate is drawn from and their ids [m, K] (None: all V ids, in order)."""
    if k <= 0 or k >= processed.shape[-1]:
        return probs, None
    index = processed.topk(k, dim=-1).indices  # [m, k], largest first
    return probs.gather(1, index), index


def reference_draw(probs: Tensor, generator: torch.Generator) -> Tensor:
    """torch.multinomial(probs, 1)'s draw, bit for bit, as a chunk of its stream: probs [k, V] -> [k].

    multinomial takes argmax(p / q) over q ~ Exp(1), one per entry, made on the CPU as
    float32(-log1p(-u)) from a float64 uniform u; k consecutive rows consume k * V uniforms.
    """
    u = torch.rand(probs.shape, generator=generator, dtype=torch.float64, device=probs.device)  # [k, V]
    q = torch.log1p(u.neg_()).neg_().to(probs.dtype)
    del u
    return torch.div(probs, q, out=q).argmax(dim=-1)  # p / q, in q's memory


def inverse_cdf_draw(probs: Tensor, u: Tensor) -> Tensor:
    """One categorical draw per row from one uniform each: probs [k, V], u [k] in [0, 1) -> ids [k].

    A two-level inverse CDF: pick a block of _BLOCK ids by the blocks' cumulative mass, then an id
    inside it. The same distribution as multinomial (up to float32 rounding of the sums); ids of zero
    probability are never returned.
    """
    k, v = probs.shape
    nb = -(-v // _BLOCK)
    if nb * _BLOCK != v:
        probs = torch.cat([probs, probs.new_zeros(k, nb * _BLOCK - v)], dim=1)
    blocks = probs.view(k, nb, _BLOCK)  # [k, nb, W]
    mass = blocks.sum(dim=-1)  # [k, nb]
    cum = mass.cumsum(dim=-1)  # [k, nb]
    target = (u.to(cum.dtype) * cum[:, -1])[:, None]  # [k, 1]
    bi = _last_positive(torch.searchsorted(cum, target, right=True), mass)  # [k, 1]
    before = cum.gather(1, bi) - mass.gather(1, bi)  # [k, 1] mass before the block
    inner = blocks[torch.arange(k, device=probs.device), bi[:, 0]]  # [k, W]
    icum = inner.cumsum(dim=-1)
    j = _last_positive(torch.searchsorted(icum, (target - before).clamp_(min=0), right=True), inner)
    return (bi * _BLOCK + j)[:, 0]


def _last_positive(index: Tensor, weights: Tensor) -> Tensor:
    """Clamp index [k, 1] (from searchsorted, right=True) to the last position of weights [k, n] with mass
    (rounding can carry a target past the end, onto zero-probability entries)."""
    n = weights.shape[-1]
    positions = torch.arange(n, device=weights.device)
    last = torch.where(weights > 0, positions, -1).amax(dim=-1, keepdim=True).clamp_(min=0)
    return torch.minimum(index.clamp_(max=n - 1), last)
