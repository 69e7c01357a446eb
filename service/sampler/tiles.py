"""One denoising step's vocabulary work over a batch of canvases, in tiles of positions.

The rows of a step are the positions of every live canvas, flattened: N = B * L. They go through the
unembedding, soft-cap, temperature, token-class mask, softmax, entropy, argmax, a candidate draw and the
self-conditioning matmul a tile of rows at a time, so no [B, L, V] tensor (nor an [L, V] float64 one) ever
exists. Each tile reads the tied embedding twice (unembedding and self-conditioning), so fewer, larger tiles
read fewer weight bytes per step. Two modes (the runner picks, `fixed_tile`):

- fixed (batch-invariant mode, and a CPU by default): every tile has exactly `tile` rows (the last is padded
  with zero rows). Its GEMMs have one shape whatever the batch, so a canvas's bits do not depend on what it
  was batched with.
- growing (throughput mode on a GPU): a step's tile is min(`tile`, N) rows, unpadded; `tile` is then the
  largest tile the device's budget allows (`tile_rows_for`), several canvases, so the embedding is read
  twice per tile rather than twice per canvas. UNVERIFIED on a GPU.

Everything stays on the hidden states' device; there is no host sync in here.

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
# Rows whose reference entropy and float64 uniforms, and whose top_k candidates, are made at once inside a
# tile (row-wise work: the same bits as the whole tile at once; these buffers do not grow with the tile).
_REFERENCE_ROWS = 64
# Bytes per vocabulary entry of a tile row held at once, at most: the float32 logits, the probs and one float32
# temporary (the fast sampler's log-probs, or the inverse-CDF's padded copy). The other stages hold less: the
# unembedding's bf16 output beside its float32 copy (6, before the probs exist), the class masks' gathered rows
# and bool masks beside the logits (10, also before), the self-conditioning's bf16 probs (6, logits freed).
ROW_BYTES = 4 + 4 + 4
# Bytes per vocabulary entry of a _REFERENCE_ROWS chunk held at once beside the tile's rows, at most: top_k's
# candidate ids (int64) and weights (float32), the reference draw's float64 uniforms and float32 exponentials.
CHUNK_BYTES = 8 + 4 + 8 + 4
# Share of the device's memory the default growing tile may hold (`tile_rows_for`).
TILE_MEMORY_FRACTION = 0.10


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


def tile_rows_for(canvas_length: int, vocab_size: int, device_memory: int | None = None, grow: bool = True,
                  budget_fraction: float = TILE_MEMORY_FRACTION) -> int:
    """The default (largest) tile, in rows, for a device with `device_memory` bytes in all.

    None (a CPU, the meta device): one canvas, the reference's GEMM shape, so the reference sampler stays
    bit-exact on a CPU. Otherwise the rows whose `tile_bytes` fit `budget_fraction` of the memory, in whole
    canvases: all of them when `grow`, one canvas when not (the fixed tile). When not even one canvas fits, the
    canvas halved until the tile fits (at least 16 rows)."""
    if device_memory is None:
        return canvas_length
    budget = budget_fraction * device_memory
    fit = int((budget - tile_bytes(0, vocab_size)) // (ROW_BYTES * vocab_size))  # rows that fit the budget
    if fit >= canvas_length:
        return canvas_length * (fit // canvas_length if grow else 1)
    tile = canvas_length
    while tile > 16 and tile_bytes(tile, vocab_size) > budget:
        tile //= 2
    return tile


def tile_bytes(rows: int, vocab_size: int) -> int:
    """Bytes a tile of `rows` rows holds at most at once: ROW_BYTES per row and entry, and one _REFERENCE_ROWS
    chunk's CHUNK_BYTES, which does not grow with the tile. (Small [rows, H] and [rows, K] tensors, and a CUDA
    sort's workspace inside a large top_k, are not counted.)"""
    return vocab_size * (ROW_BYTES * rows + CHUNK_BYTES * _REFERENCE_ROWS)


def step_tile_rows(tile: int, rows: int, fixed_tile: bool) -> int:
    """Rows of each tile of a step over `rows` rows: `tile` when fixed (the last padded), else min(tile, rows)."""
    return tile if fixed_tile else min(tile, rows)


def sample_step(vocab: Vocab, hidden: Tensor, draws: list[CanvasDraw], tile: int,
                class_masks: Tensor | None = None, fixed_tile: bool = True) -> StepSample:
    """hidden [B, L, H] (final-normed decoder output) -> StepSample; class_masks: bool [C, V].

    tile: the most rows a tile has; fixed_tile: every tile has exactly `tile` rows (else min(tile, B * L))."""
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
    for start, stop, rows in tiles_of(flat, step_tile_rows(tile, n, fixed_tile), pad=fixed_tile):
        m = stop - start
        logits = vocab.logits(rows)[:m]  # [m, V] float32
        processed = logits.div_(temps[start:stop])
        if class_ids is not None:
            constrain_logits_(processed, class_ids[start:stop], class_masks)
        argmax[start:stop] = processed.argmax(dim=-1)
        probs = processed.new_empty(rows.shape[0], processed.shape[1])  # [T, V]: every canvas's share, in place
        if m < rows.shape[0]:
            probs[m:].zero_()  # the padding rows of a fixed tile
        for c, lo, hi in _segments(start, stop, length):  # each canvas's share of the tile, in row order
            d = draws[c]
            u = None if fast_u[c] is None else fast_u[c][lo - c * length : hi - c * length]
            share, rows_c = probs[lo - start : hi - start], processed[lo - start : hi - start]  # [k, V] each
            entropy[lo:hi], ids = _sample_rows(rows_c, d, u, share)
            sampled[lo:hi] = argmax[lo:hi] if ids is None else ids
            if lps[c] is not None:
                _record_logprobs(lps[c], lo - c * length, share, rows_c, argmax[lo:hi], d.top_k)
        del logits, processed, share, rows_c  # views too: the next tile's logits must not meet these
        soft[start:stop] = vocab.soft_embedding(probs)[:m]
        del probs
    return StepSample(entropy.view(b, length), argmax.view(b, length), sampled.view(b, length),
                      soft.view(b, length, h), lps if any(lp is not None for lp in lps) else None)


def tiles_of(flat: Tensor, tile: int, pad: bool = True):
    """(start, stop, rows [tile, H]) over flat [N, H], `tile` rows at a time; the last padded with zero rows when
    `pad` (static tile shape), else as short as it is."""
    n = flat.shape[0]
    for start in range(0, n, tile):
        stop = min(n, start + tile)
        rows = flat[start:stop]
        if pad and stop - start < tile:
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
    0 < top_k < V (then _REFERENCE_ROWS rows at a time, so the [rows, top_k] buffers do not grow with the tile).
    Only [k, K] tensors are made besides."""
    keep = out.top.shape[1]
    k, v = processed.shape
    filtered = 0 < top_k < v
    for r in _chunks(k, _REFERENCE_ROWS if filtered else k):
        p, x, rows = probs[r], processed[r], slice(lo + r.start, lo + r.stop)  # [c, V] each
        chosen = p.gather(1, argmax[r, None])  # [c, 1]
        if filtered:
            index = x.topk(top_k, dim=-1).indices  # [c, top_k], largest first (as the draw's candidates)
            kept = p.gather(1, index)  # [c, top_k]
            norm = kept.sum(dim=-1, keepdim=True).log_()  # [c, 1]
            kept, index = kept[:, :keep], index[:, :keep]
        else:
            index = x.topk(keep, dim=-1).indices  # [c, K]
            kept, norm = p.gather(1, index), None
        out.chosen[rows] = _log(chosen, norm)[:, 0]
        out.top[rows] = _log(kept, norm)
        out.top_ids[rows] = index


def _log(p: Tensor, norm: Tensor | None) -> Tensor:
    """log(p) - norm ([c, n], norm [c, 1] or None: 0)."""
    return p.log() if norm is None else p.log() - norm


def _chunks(rows: int, size: int) -> list[slice]:
    """Row slices of at most `size` rows (size >= 1) over `rows`, in order."""
    return [slice(i, min(rows, i + size)) for i in range(0, rows, max(size, 1))]


def _segments(start: int, stop: int, length: int):
    """(canvas index, first row, last row + 1) of each canvas's share of rows [start, stop), in order."""
    r = start
    while r < stop:
        c = r // length
        end = min(stop, (c + 1) * length)
        yield c, r, end
        r = end


def _sample_rows(processed: Tensor, draw: CanvasDraw, u: Tensor | None, probs: Tensor) -> tuple[Tensor, Tensor | None]:
    """One canvas's rows of a tile: writes their probs into probs [k, V]; returns entropy [k] and a candidate id
    [k] per row (None when greedy: the candidates are the argmax).

    The reference sampler: torch.softmax, the reference's entropy formula and multinomial's stream,
    bit for bit. The fast one: one fused log_softmax, and an inverse-CDF draw from the uniforms u [k].
    """
    if draw.reference:
        torch.softmax(processed, dim=-1, dtype=torch.float32, out=probs)
        parts = [(ops.token_entropy(processed[r]),  # in row order: the stream's order
                  None if draw.greedy else _filtered(reference_draw, probs[r], processed[r], draw.top_k,
                                                     draw.generator))
                 for r in _chunks(processed.shape[0], _REFERENCE_ROWS)]
        ids = None if draw.greedy else torch.cat([i for _, i in parts])
        return torch.cat([h for h, _ in parts]), ids
    _, entropy = ops.fast_probs_and_entropy(processed, out=probs)
    if draw.greedy:
        return entropy, None
    return entropy, _filtered(inverse_cdf_draw, probs, processed, draw.top_k, u)


def _filtered(draw_fn: Callable[[Tensor, object], Tensor], probs: Tensor, processed: Tensor, k: int,
              source: object) -> Tensor:
    """draw_fn(probs, source)'s ids [m], drawn among each row's k largest processed logits only (ties broken
    as torch.topk does) when 0 < k < V. The draw runs on the k gathered probabilities (both draws are
    scale-free: no renormalisation), so no second [m, V] tensor is made; under a top_k, _REFERENCE_ROWS rows
    at a time (row-wise: the same ids), so the candidates' buffers do not grow with the tile. source: a
    generator, or one uniform per row [m]."""
    m, v = processed.shape
    ids = []
    for r in _chunks(m, _REFERENCE_ROWS if 0 < k < v else m):
        weights, index = candidates(probs[r], processed[r], k)
        chunk = draw_fn(weights, source[r] if isinstance(source, Tensor) else source)
        ids.append(chunk if index is None else index.gather(1, chunk[:, None])[:, 0])
    return ids[0] if len(ids) == 1 else torch.cat(ids)


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
    q = u.neg_().log1p_().neg_().to(probs.dtype)  # in u's memory until the float32 copy
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
