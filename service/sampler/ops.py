"""The entropy-bound sampler as small pure functions over one canvas's tensors.

Each function makes the same random draws, in the same order and shapes, as the reference
(`transformers` EntropyBoundSampler and DiffusionGemmaGenerationMixin), from a per-request generator.
Shapes: L = canvas length, V = vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor


def init_canvas(length: int, vocab_size: int, generator: torch.Generator, device: torch.device | str = "cpu") -> Tensor:
    """A canvas drawn uniformly over the vocabulary: [L]."""
    return torch.randint(0, vocab_size, (1, length), generator=generator, device=device)[0]


def temperature(step: int, max_steps: int, t_min: float, t_max: float) -> Tensor:
    """T(n) = t_min + (t_max - t_min) * n / N, with n counting down N..1; float32 as the reference computes it."""
    n = torch.tensor(step, dtype=torch.int32)
    return t_min + ((t_max - t_min) * (n / max_steps))


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) per position: [L, V] -> [L], bit for bit Categorical(logits=...).entropy().

    (Categorical also clamps the normalised logits to the dtype's minimum: a no-op on finite logits.)
    """
    norm = logits - logits.logsumexp(dim=-1, keepdim=True)
    return -torch.softmax(norm, dim=-1).mul_(norm).sum(-1)


def fast_token_entropy(logits: Tensor, probs: Tensor) -> Tensor:
    """The same entropy from probs = softmax(logits) in one pass: H = logsumexp(x) - sum(p * x)."""
    return logits.logsumexp(dim=-1) - (probs * logits).sum(-1)


def sample_tokens(probs: Tensor, generator: torch.Generator, rows: Tensor | None = None) -> Tensor:
    """One categorical draw per position, bit for bit torch.multinomial's: probs [L, V] -> [L].

    multinomial(probs, 1) takes argmax(p / q) over q ~ Exp(1), one per entry, each made on the CPU as
    float32(-log1p(-u)) from a float64 uniform u. We draw the same L * V uniforms, so the generator
    advances exactly as the reference's, but turn only the `rows` (bool [L]) whose ids are used into
    exponentials; other positions get 0. The serial uniform stream is the costliest part of a CPU step.
    """
    u = torch.rand(probs.shape, generator=generator, dtype=torch.float64, device=probs.device)  # [L, V]
    rows = _rows(probs, rows)
    q = torch.log1p(u[rows].neg_()).neg_().to(probs.dtype)  # [k, V]: the exponentials multinomial makes
    return _scatter_rows(probs, rows, (probs[rows] / q).argmax(dim=-1))


def fast_sample_tokens(probs: Tensor, generator: torch.Generator, rows: Tensor | None = None) -> Tensor:
    """One categorical draw per used position from one uniform each (inverse CDF): probs [L, V] -> [L].

    The same distribution as `sample_tokens`, a different random stream: ids differ from the reference's.
    Only the `rows` (bool [L]) whose ids are used are drawn; other positions get 0.
    """
    rows = _rows(probs, rows)
    cdf = probs[rows].cumsum(dim=-1)  # [k, V]
    u = torch.rand(cdf.shape[0], 1, generator=generator, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    ids = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)  # [k]
    return _scatter_rows(probs, rows, ids)


def _rows(probs: Tensor, rows: Tensor | None) -> Tensor:
    """The positions to draw ids for: bool [L], every one when rows is None."""
    return torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device) if rows is None else rows


def _scatter_rows(probs: Tensor, rows: Tensor, ids: Tensor) -> Tensor:
    """ids [k] of the chosen rows placed in an [L] id tensor, 0 elsewhere."""
    out = torch.zeros(probs.shape[0], dtype=torch.long, device=probs.device)
    out[rows] = ids
    return out


def accept_mask(entropy: Tensor, bound: float, pinned: Tensor | None = None) -> Tensor:
    """Accept the lowest-entropy positions while cumsum(H) - H <= bound: [L] -> bool [L].

    Pinned positions count as zero entropy, so they never use up the bound.
    """
    if pinned is not None:
        entropy = torch.where(pinned, torch.zeros_like(entropy), entropy)
    sorted_h, order = torch.sort(entropy, dim=-1, descending=False)
    selected = torch.cumsum(sorted_h, dim=-1) - sorted_h <= bound
    return torch.scatter(torch.zeros_like(selected), -1, order, selected)


def renoise(canvas: Tensor, accepted: Tensor, vocab_size: int, generator: torch.Generator) -> Tensor:
    """Replace every non-accepted position by a uniform draw: [L] -> [L]."""
    noise = init_canvas(canvas.shape[-1], vocab_size, generator, canvas.device)
    return torch.where(~accepted, noise, canvas)


def apply_pins(canvas: Tensor, pin_ids: Tensor | None, pin_mask: Tensor | None) -> Tensor:
    if pin_mask is None:
        return canvas
    return torch.where(pin_mask, pin_ids, canvas)


def is_stable(history: list[Tensor], argmax: Tensor) -> bool:
    """True when `argmax` equals each of the last `stability_threshold` argmax canvases (history holds them)."""
    return all(bool(torch.equal(h, argmax)) for h in history)


def mean_entropy(entropy: Tensor, pinned: Tensor | None) -> float:
    """Mean entropy over the free (unpinned) positions; 0 when every position is pinned."""
    if pinned is not None:
        free = entropy[~pinned]
        return float(free.mean()) if free.numel() else 0.0
    return float(entropy.mean())


def finalize_canvas(tokens: Tensor, eos_ids: Tensor, pad_id: int, pinned: Tensor | None = None) -> tuple[Tensor, bool]:
    """Tokens after the first EOS become pad, except pinned ones. Returns the canvas and whether it held an EOS."""
    is_eos = torch.isin(tokens, eos_ids)
    if not bool(is_eos.any()):
        return tokens, False
    c = is_eos.cumsum(dim=-1)
    pad = (c > 0) & ~((c == 1) & is_eos)
    if pinned is not None:
        pad &= ~pinned
    return torch.where(pad, torch.full_like(tokens, pad_id), tokens), True
