"""The KV cache that encoder mode writes and decoder mode reads. Owned by the caller (engine/scheduler).

Rows are left-aligned: row b holds the keys of absolute positions 0..lengths[b]-1 in slots 0..lengths[b]-1,
so a slot index is its token's position and masks follow from `lengths` alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from service.model.config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        self.cfg = cfg
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        for spec in cfg.layers:
            shape = (batch, spec.num_kv_heads, capacity, spec.head_dim)
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # [B]

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def reserve(self, needed: int) -> None:
        """Grow every layer to hold `needed` positions (doubling, so appends stay amortised)."""
        if needed <= self.capacity:
            return
        new_cap = max(needed, 2 * self.capacity)
        for lst in (self.k, self.v):
            for i, t in enumerate(lst):
                grown = t.new_zeros(t.shape[0], t.shape[1], new_cap, t.shape[3])
                grown[:, :, : t.shape[2]] = t
                lst[i] = grown

    def write(self, layer: int, k: Tensor, v: Tensor, counts: Tensor) -> None:
        """Append k/v [B, Hkv, T, D] at each row's end; row b takes only its first counts[b] tokens."""
        for b, (start, n) in enumerate(zip(self.lengths.tolist(), counts.tolist())):
            if n:
                self.k[layer][b, :, start : start + n] = k[b, :, :n]
                self.v[layer][b, :, start : start + n] = v[b, :, :n]

    def select(self, rows: list[int]) -> "KVCache":
        """A new cache holding copies of the given rows, trimmed to their longest length."""
        out = KVCache.__new__(KVCache)
        out.cfg = self.cfg
        idx = torch.tensor(rows, dtype=torch.long, device=self.lengths.device)
        out.lengths = self.lengths[idx].clone()
        used = int(out.lengths.max()) if len(rows) else 0
        out.k = [t[idx, :, :used].clone() for t in self.k]
        out.v = [t[idx, :, :used].clone() for t in self.v]
        return out
