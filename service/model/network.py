"""The DiffusionGemma network: one Gemma 4 MoE backbone run in encoder or decoder mode. No sampling here."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.model.cache import KVCache, PagedCache
from service.model.config import ModelConfig
from service.model.kv_pool import BLOCK, KVPool
from service.model.layers import DenseMLP, Layer, RMSNorm, rope_cos_sin, rope_inv_freq


Cache = KVCache | PagedCache


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
    # False (default, throughput): one expert GEMM per projection per layer for the whole batch of a decoder pass.
    # True: each canvas's ids are those of its solo run, bit for bit (Layer.feed_forward); set by the runner.
    batch_invariant = False

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

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.cfg, capacity, self.dtype, self.device)

    def embed(self, ids: Tensor) -> Tensor:
        return self.embed_tokens(ids) * self.embed_scale.to(self.dtype)

    def _rope(self, i: int, positions: Tensor) -> tuple[Tensor, Tensor]:
        return rope_cos_sin(getattr(self, f"inv_freq_{i}"), positions, self.dtype)

    def _first_visible(self, sliding: bool, length: int) -> int:
        """First cached position a layer sees: the reference's sliding cache keeps the last window - 1."""
        return max(0, length - (self.cfg.sliding_window - 1)) if sliding else 0

    @torch.no_grad()
    def encode(self, ids: Tensor, counts: list[int], caches: list[Cache]) -> None:
        """Encoder mode: row b's first counts[b] ids of ids [B, T] extend caches[b] (causal pass).

        Rows run one after another, each exactly as a batch of one, so a cache never depends on
        what its request was batched with (prompt lengths vary too much for batch-invariant GEMMs).
        """
        for r, (cache, n) in enumerate(zip(caches, counts)):
            if n:
                self._encode_one(ids[r : r + 1, :n], cache)

    def _encode_one(self, ids: Tensor, cache: Cache) -> None:
        """ids [1, T] appended to one sequence's cache."""
        t, w = ids.shape[1], self.cfg.sliding_window
        start, end = cache.length, cache.length + t
        cache.reserve(end)
        positions = torch.arange(start, end, device=ids.device)[None]  # [1, T]
        x = self.embed(ids)  # [1, T, H]
        for i, layer in enumerate(self.layers):
            sliding = layer.spec.sliding
            cos, sin = self._rope(i, positions)
            q, k, v = layer.self_attn.qkv(layer.input_layernorm(x), cos, sin)  # [1, H*, T, D]
            cache.write(i, start, k[0], v[0])
            lo = self._first_visible(sliding, start)
            if start == 0 and (not sliding or end < w):
                mask, causal = None, True  # a plain causal prefill, as the reference runs it
            else:
                qpos = positions[0, :, None]
                kpos = torch.arange(lo, end, device=ids.device)[None, :]
                mask = (kpos <= qpos) & ((kpos > qpos - w) if sliding else True)
                mask, causal = mask[None, None], False  # [1, 1, T, Tk]
            keys, values = cache.read(i, lo, end)
            h = layer.self_attn.o_proj(layer.self_attn.attend(q, keys, values, mask, causal))
            x = x + layer.post_attention_layernorm(h)
            x = layer.feed_forward(x) * layer.encoder_layer_scalar
        cache.length = end

    @torch.no_grad()
    def decode(self, canvas: Tensor, soft: Tensor | None, caches: list[Cache]) -> Tensor:
        """Decoder mode: bidirectional pass over canvas [B, L] and each row's cached prefix (the prefix is read
        only; the canvas's keys and values go to the positions past it, which the commit overwrites).

        soft [B, L, H] is the previous step's soft embedding (zeros, or None for all rows, on a first step).
        Returns the final-normed hidden states [B, L, H]. Attention runs row by row over exactly the visible keys
        (each row's bits are its solo pass's); `decode_paged` is the batched, padded form.
        """
        b, length = canvas.shape
        # [B, L]; made on the device (no host-to-device copy), so a GPU step can be captured as a CUDA graph
        positions = torch.stack([torch.arange(c.length, c.length + length, device=canvas.device) for c in caches])
        x = self._decoder_input(canvas, soft)
        for i, layer in enumerate(self.layers):
            cos, sin = self._rope(i, positions)
            q, k, v = layer.self_attn.qkv(layer.input_layernorm(x), cos, sin)
            rows = []
            for r, c in enumerate(caches):  # [1, Hkv, T + L, D]: the visible prefix, then this canvas
                c.write(i, c.length, k[r], v[r])
                keys, values = c.read(i, self._first_visible(layer.spec.sliding, c.length), c.length + length)
                rows.append(layer.self_attn.attend(q[r : r + 1], keys, values, None))  # all in view attend
            x = self._decoder_block(layer, x, torch.cat(rows))
        return self.norm(x)

    @torch.no_grad()
    def decode_paged(self, canvas: Tensor, soft: Tensor | None, pool: KVPool, table: Tensor, lengths: Tensor,
                     kv_len: int) -> Tensor:
        """`decode` for a batch whose caches live in one KVPool, in one attention call per layer: every row reads
        kv_len keys by its block table (table [B, >= kv_len / BLOCK], lengths [B], on the device), keys past its
        canvas or before its sliding window masked. Static shapes and no host reads: the CUDA-graph path
        (service/engine/cuda_graphs.py). Padding rows (length 0, table all NULL_BLOCK) compute finite values
        that are dropped. Equals `decode` up to float rounding (the padded softmax sums in another order)."""
        b, length = canvas.shape
        dev = canvas.device
        positions = lengths[:, None] + torch.arange(length, device=dev)  # [B, L]
        write = pool.slot_index(table, positions).reshape(-1)  # [B*L]
        kpos = torch.arange(kv_len, device=dev)  # [Tk]
        read = pool.slot_index(table[:, : -(-kv_len // BLOCK)], kpos.expand(b, kv_len)).reshape(-1)  # [B*Tk]
        visible = kpos < (lengths + length)[:, None]  # [B, Tk]
        in_window = visible & (kpos > (lengths - self.cfg.sliding_window)[:, None])  # _first_visible's window
        x = self._decoder_input(canvas, soft)
        for i, layer in enumerate(self.layers):
            cos, sin = self._rope(i, positions)
            q, k, v = layer.self_attn.qkv(layer.input_layernorm(x), cos, sin)  # q [B, Hq, L, D], k/v [B, Hkv, L, D]
            hkv, d = k.shape[1], k.shape[3]
            pool.k[i].index_copy_(1, write, k.transpose(0, 1).reshape(hkv, b * length, d))
            pool.v[i].index_copy_(1, write, v.transpose(0, 1).reshape(hkv, b * length, d))
            keys = pool.k[i].index_select(1, read).view(hkv, b, kv_len, d).transpose(0, 1)  # [B, Hkv, Tk, D]
            values = pool.v[i].index_select(1, read).view(hkv, b, kv_len, d).transpose(0, 1)
            mask = (in_window if layer.spec.sliding else visible)[:, None, None, :]  # [B, 1, 1, Tk]
            x = self._decoder_block(layer, x, layer.self_attn.attend_keys_masked(q, keys, values, mask))
        return self.norm(x)

    def _decoder_input(self, canvas: Tensor, soft: Tensor | None) -> Tensor:
        x = self.embed(canvas)
        return self.self_conditioning(x, soft if soft is not None else torch.zeros_like(x))

    def _decoder_block(self, layer: Layer, x: Tensor, heads: Tensor) -> Tensor:
        """The rest of a decoder layer after attention: heads [B, L, Hq*D] -> x [B, L, H]."""
        x = x + layer.post_attention_layernorm(layer.self_attn.o_proj(heads))
        return layer.feed_forward(x, self.batch_invariant) * layer.decoder_layer_scalar

    def logits(self, hidden: Tensor) -> Tensor:
        """Tied unembedding with the final soft-cap: hidden [..., H] -> float32 logits [..., V]."""
        cap = self.cfg.final_logit_softcapping
        x = F.linear(hidden, self.embed_tokens.weight).float()
        if torch.is_grad_enabled():  # training: autograd needs the intermediate values
            return torch.tanh(x / cap) * cap
        return x.div_(cap).tanh_().mul_(cap)  # serving: the same bits, no extra [L, V] buffers

    def soft_embedding(self, probs: Tensor) -> Tensor:
        """probs [..., V] (float32) -> the self-conditioning input [..., H]."""
        w = self.embed_tokens.weight
        return torch.matmul(probs.to(w.dtype), w) * self.embed_scale.to(w.dtype)
