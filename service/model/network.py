"""The DiffusionGemma network: one Gemma 4 MoE backbone run in encoder or decoder mode. No sampling here."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.model.cache import KVCache
from service.model.config import ModelConfig
from service.model.layers import DenseMLP, Layer, RMSNorm, rope_cos_sin, rope_inv_freq


class SelfConditioning(nn.Module):
    """Gated MLP over the previous step's soft embedding, added to the canvas embedding."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, with_scale=False)
        self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_activation)

    def forward(self, embeds: Tensor, soft: Tensor) -> Tensor:
        return self.post_norm(embeds + self.mlp(self.pre_norm(soft)))


class DiffusionGemma(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Layer(cfg, spec) for spec in cfg.layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_conditioning = SelfConditioning(cfg)
        for i, spec in enumerate(cfg.layers):
            self.register_buffer(f"inv_freq_{i}", rope_inv_freq(spec), persistent=False)
        self.register_buffer("embed_scale", torch.tensor(cfg.embed_scale), persistent=False)

    def reset_buffers(self) -> None:
        """Recompute the non-persistent float32 buffers (after meta init or a dtype cast)."""
        dev = self.embed_tokens.weight.device
        for i, spec in enumerate(self.cfg.layers):
            setattr(self, f"inv_freq_{i}", rope_inv_freq(spec).to(dev))
        self.embed_scale = torch.tensor(self.cfg.embed_scale, device=dev)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(self.cfg, batch, capacity, self.dtype, self.device)

    def embed(self, ids: Tensor) -> Tensor:
        return self.embed_tokens(ids) * self.embed_scale.to(self.dtype)

    def _rope(self, i: int, positions: Tensor) -> tuple[Tensor, Tensor]:
        return rope_cos_sin(getattr(self, f"inv_freq_{i}"), positions, self.dtype)

    def _window_start(self, sliding: bool, length: Tensor) -> Tensor:
        """First cached position a layer's queries can see: the reference's sliding cache keeps window - 1."""
        return (length - (self.cfg.sliding_window - 1)).clamp(min=0) if sliding else torch.zeros_like(length)

    @torch.no_grad()
    def encode(self, ids: Tensor, counts: Tensor, cache: KVCache) -> None:
        """Encoder mode: causal pass over ids [B, T] (row b: first counts[b] valid), appended to `cache`."""
        b, t = ids.shape
        start = cache.lengths  # [B]
        positions = start[:, None] + torch.arange(t, device=ids.device)  # [B, T]
        end = start + counts  # [B]
        cache.reserve(int(end.max()))
        kv_end = int(end.max())
        views = {}  # sliding -> (first key slot, mask or None, causal)
        for sliding in {spec.sliding for spec in self.cfg.layers}:
            lo = int(self._window_start(sliding, start).min()) if b == 1 else 0
            if b == 1 and int(start[0]) == 0 and (not sliding or kv_end < self.cfg.sliding_window):
                views[sliding] = (lo, None, True)  # plain causal prefill, as the reference runs it
                continue
            key_pos = torch.arange(lo, kv_end, device=ids.device)  # [Tk]
            visible = (key_pos[None, None, :] <= positions[:, :, None]) & (key_pos[None, None, :] < end[:, None, None])
            if sliding:
                visible &= key_pos[None, None, :] > positions[:, :, None] - self.cfg.sliding_window
            views[sliding] = (lo, visible[:, None], False)  # [B, 1, T, Tk]
        x = self.embed(ids)  # [B, T, H]
        for i, layer in enumerate(self.layers):
            cos, sin = self._rope(i, positions)
            h = layer.input_layernorm(x)
            q, k, v = layer.self_attn.qkv(h, cos, sin)
            cache.write(i, k, v, counts)
            lo, mask, causal = views[layer.spec.sliding]
            keys, values = cache.k[i][:, :, lo:kv_end], cache.v[i][:, :, lo:kv_end]
            h = layer.self_attn.attend(q, keys, values, mask, causal)
            x = x + layer.post_attention_layernorm(h)
            x = layer.feed_forward(x) * layer.encoder_layer_scalar
        cache.lengths = end

    @torch.no_grad()
    def decode(self, canvas: Tensor, soft: Tensor | None, cache: KVCache) -> Tensor:
        """Decoder mode: bidirectional pass over canvas [B, L] and the cached prefix (read only).

        soft [B, L, H] is the previous step's soft embedding (None on a canvas's first step).
        Returns the final-normed hidden states [B, L, H].
        """
        b, length = canvas.shape
        lengths = cache.lengths  # [B]
        positions = lengths[:, None] + torch.arange(length, device=canvas.device)  # [B, L]
        kv_end = int(lengths.max()) if b else 0
        views = {}  # sliding -> (first key slot, mask or None)
        for sliding in {spec.sliding for spec in self.cfg.layers}:
            first = self._window_start(sliding, lengths)  # [B]
            if b == 1:
                views[sliding] = (int(first[0]), None)  # everything in view attends: no mask, as the reference
                continue
            key_pos = torch.arange(kv_end, device=canvas.device)
            cached = (key_pos[None, :] < lengths[:, None]) & (key_pos[None, :] >= first[:, None])  # [B, Tc]
            ones = torch.ones(b, length, dtype=torch.bool, device=canvas.device)
            views[sliding] = (0, torch.cat([cached, ones], dim=1)[:, None, None, :])  # [B, 1, 1, Tc+L]
        x = self.embed(canvas)
        x = self.self_conditioning(x, soft if soft is not None else torch.zeros_like(x))
        for i, layer in enumerate(self.layers):
            cos, sin = self._rope(i, positions)
            h = layer.input_layernorm(x)
            q, k, v = layer.self_attn.qkv(h, cos, sin)
            lo, mask = views[layer.spec.sliding]
            keys = torch.cat([cache.k[i][:, :, lo:kv_end], k], dim=2)
            values = torch.cat([cache.v[i][:, :, lo:kv_end], v], dim=2)
            h = layer.self_attn.attend(q, keys, values, mask)
            x = x + layer.post_attention_layernorm(h)
            x = layer.feed_forward(x) * layer.decoder_layer_scalar
        return self.norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        """Tied unembedding with the final soft-cap: hidden [..., H] -> float32 logits [..., V]."""
        cap = self.cfg.final_logit_softcapping
        return torch.tanh(F.linear(hidden, self.embed_tokens.weight).float() / cap) * cap

    def soft_embedding(self, probs: Tensor) -> Tensor:
        """probs [..., V] (float32) -> the self-conditioning input [..., H]."""
        w = self.embed_tokens.weight
        return torch.matmul(probs.to(w.dtype), w) * self.embed_scale.to(w.dtype)
