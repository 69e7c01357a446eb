"""The uniform-state denoising objective the sampler assumes, over our own network (differentiable).

One pass runs both modes layer by layer: encoder mode over the clean prefix (causal, sliding window)
and decoder mode over the noisy canvas (bidirectional over prefix K/V and canvas), sharing weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from service.model.network import DiffusionGemma


def forward_train(model: DiffusionGemma, prefix: Tensor, canvas: Tensor, soft: Tensor | None) -> Tensor:
    """prefix [B, P] clean ids, canvas [B, L] noisy ids, soft [B, L, H] or None -> logits [B, L, V]."""
    w = model.cfg.sliding_window
    p, length = prefix.shape[1], canvas.shape[1]
    dev = prefix.device
    pos_p = torch.arange(p, device=dev)[None]
    pos_c = torch.arange(p, p + length, device=dev)[None]
    kp = torch.arange(p, device=dev)
    enc = {False: kp[None, :] <= kp[:, None]}
    enc[True] = enc[False] & (kp[None, :] > kp[:, None] - w)
    ones = torch.ones(length, length, dtype=torch.bool, device=dev)
    dec = {
        False: torch.ones(length, p + length, dtype=torch.bool, device=dev),
        True: torch.cat([(kp > p - w).expand(length, p), ones], dim=1),
    }
    xe = model.embed(prefix)
    xd = model.embed(canvas)
    xd = model.self_conditioning(xd, soft if soft is not None else torch.zeros_like(xd))
    for i, layer in enumerate(model.layers):
        sl = layer.spec.sliding
        cos_p, sin_p = model._rope(i, pos_p)
        cos_c, sin_c = model._rope(i, pos_c)
        qe, ke, ve = layer.self_attn.qkv(layer.input_layernorm(xe), cos_p, sin_p)
        qd, kd, vd = layer.self_attn.qkv(layer.input_layernorm(xd), cos_c, sin_c)
        ad = layer.self_attn.o_proj(
            layer.self_attn.attend(qd, torch.cat([ke, kd], 2), torch.cat([ve, vd], 2), dec[sl][None, None])
        )
        xd = xd + layer.post_attention_layernorm(ad)
        if i == len(model.layers) - 1:  # the last encoder layer's output feeds nothing
            xd = layer.feed_forward(xd, batch_invariant=False) * layer.decoder_layer_scalar
            break
        ae = layer.self_attn.o_proj(layer.self_attn.attend(qe, ke, ve, enc[sl][None, None]))
        xe = xe + layer.post_attention_layernorm(ae)
        # per-token blocks: one call serves both modes
        both = layer.feed_forward(torch.cat([xe, xd], dim=1), batch_invariant=False)
        xe = both[:, :p] * layer.encoder_layer_scalar
        xd = both[:, p:] * layer.decoder_layer_scalar
    return model.logits(model.norm(xd))


def corrupt(clean: Tensor, vocab: int, gen: torch.Generator, span_fraction: float = 0.5,
            span_min_noise: float = 0.5) -> tuple[Tensor, Tensor]:
    """Uniform-state noise: each example gets a level t; span examples noise one contiguous gap only,
    at a level of at least `span_min_noise` (lower floors cover the denoising loop's later steps).

    Returns the noisy canvas [B, L] and the noised-position mask [B, L].
    """
    b, length = clean.shape
    t = torch.rand(b, 1, generator=gen) * 0.95 + 0.05
    noise_mask = torch.rand(b, length, generator=gen) < t
    span = torch.rand(b, generator=gen) < span_fraction
    for i in torch.nonzero(span).flatten().tolist():
        g = int(torch.randint(4, length // 2 + 1, (1,), generator=gen))
        start = 0 if torch.rand(1, generator=gen) < 0.5 else int(torch.randint(0, length - g + 1, (1,), generator=gen))
        m = torch.zeros(length, dtype=torch.bool)
        m[start : start + g] = True
        noise_mask[i] = m & (torch.rand(length, generator=gen) < max(float(t[i]), span_min_noise))
    random_ids = torch.randint(0, vocab, (b, length), generator=gen)
    # drawn on the CPU (the generator's device), used where the canvas lives (a GPU when training there)
    noise_mask, random_ids = noise_mask.to(clean.device), random_ids.to(clean.device)
    return torch.where(noise_mask, random_ids, clean), noise_mask


def loss_step(model: DiffusionGemma, prefix: Tensor, clean: Tensor, gen: torch.Generator,
              span_fraction: float = 0.5, span_min_noise: float = 0.5) -> tuple[Tensor, dict]:
    """One training loss: denoise the corrupted canvas; half the time self-conditioned on a detached pass."""
    noisy, noised = corrupt(clean, model.cfg.vocab_size, gen, span_fraction, span_min_noise)
    soft = None
    if torch.rand(1, generator=gen) < 0.5:
        with torch.no_grad():
            first = forward_train(model, prefix, noisy, None)
            temp = 0.4 + 0.4 * float(torch.rand(1, generator=gen))
            soft = model.soft_embedding(torch.softmax(first / temp, dim=-1)).detach()
    logits = forward_train(model, prefix, noisy, soft)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), clean.reshape(-1), reduction="none").view(clean.shape)
    loss = ce.mean()
    with torch.no_grad():
        acc = (logits.argmax(-1) == clean)[noised].float().mean() if noised.any() else torch.tensor(0.0)
    return loss, {"loss": float(loss.detach()), "noised_acc": float(acc), "self_cond": soft is not None}
