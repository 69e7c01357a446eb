"""The entropy-bound sampler as small pure functions over one canvas's tensors.

Each function makes the same random draws, in the same order and shapes, as the reference
(`transformers` EntropyBoundSampler and DiffusionGemmaGenerationMixin), from a per-request generator.
The step's vocabulary work (logits, entropy, draws) runs in tiles: service/sampler/tiles.py.
Shapes: L = canvas length, V = vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor


def init_canvas(length: int, vocab_size: int, generator: torch.Generator, device: torch.device | str = "cpu") -> Tensor:
    """A canvas drawn uniformly over the vocabulary: [L]."""
    return torch.randint(0, vocab_size, (1, length), generator=generator, device=device)[0]


def temperature(step: int | Tensor, max_steps: int, t_min: float, t_max: float,
                device: torch.device | str = "cpu") -> Tensor:
    """T(n) = t_min + (t_max - t_min) * n / N, with n counting down N..1; float32 as the reference computes it.

    step: n, or int32 n of any shape already on the device (elementwise: the same bits per n, and no
    host-to-device copy)."""
    n = step if isinstance(step, Tensor) else torch.tensor(step, dtype=torch.int32, device=device)
    return t_min + ((t_max - t_min) * (n / max_steps))


def temperature_schedule(max_steps: int, t_min: float, t_max: float, device: torch.device | str = "cpu") -> Tensor:
    """Every step's temperature at once, float32 [N]: entry i is T(N - i), the (i + 1)-th step's. Made on the
    device, once per request, so a step only takes a view of it."""
    n = torch.arange(max_steps, 0, -1, dtype=torch.int32, device=device)  # [N]: N..1
    return temperature(n, max_steps, t_min, t_max)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) per position: [L, V] -> [L], bit for bit Categorical(logits=...).entropy().

    (Categorical also clamps the normalised logits to the dtype's minimum: a no-op on finite logits.)
    """
    norm = logits - logits.logsumexp(dim=-1, keepdim=True)
    return -torch.softmax(norm, dim=-1).mul_(norm).sum(-1)


def fast_probs_and_entropy(logits: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """softmax(logits) [L, V] and its entropy [L] from one fused log_softmax: H = -sum(p * log p).

    The same values as torch.softmax and `token_entropy` up to float32 rounding (not their bits), at
    about a fifth of the work on a CPU (logsumexp is not vectorized there; log_softmax is). out: float32 [L, V]
    to write the probs into (no buffer of their own).
    """
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp() if out is None else torch.exp(log_probs, out=out)
    entropy = torch.bmm(probs.unsqueeze(-2), log_probs.unsqueeze(-1)).view(-1).neg_()  # row-wise dot products
    return probs, entropy


def accept_mask(entropy: Tensor, bound: float | Tensor, pinned: Tensor | None = None) -> Tensor:
    """Accept the lowest-entropy positions while cumsum(H) - H <= bound: [..., L] -> bool [..., L].

    Batched: entropy and pinned [B, L] with bound [B, 1] (one bound per canvas).

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


def mean_entropy(entropy: Tensor, pinned: Tensor | None) -> Tensor:
    """Mean entropy over the free (unpinned) positions, a 0-dim tensor on entropy's device; 0 when every
    position is pinned."""
    if pinned is None:
        return entropy.mean()
    free = (~pinned).sum()
    return torch.where(pinned, 0.0, entropy).sum() / free.clamp(min=1)


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
