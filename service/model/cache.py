"""The KV cache of one sequence: encoder mode writes it, decoder mode reads it. Owned by the caller.

Slot i holds the keys and values of absolute position i, so `length` is all a mask needs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from service.model.config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        capacity = max(1, capacity)
        self.k: list[Tensor] = []  # per layer [Hkv, capacity, D]
        self.v: list[Tensor] = []
        for spec in cfg.layers:
            shape = (spec.num_kv_heads, capacity, spec.head_dim)
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def reserve(self, needed: int) -> None:
        """Grow every layer to hold `needed` positions (doubling, so appends stay amortised)."""
        if needed <= self.capacity:
            return
        new_cap = max(needed, 2 * self.capacity)
        for lst in (self.k, self.v):
            for i, t in enumerate(lst):
                grown = t.new_zeros(t.shape[0], new_cap, t.shape[2])
                grown[:, : t.shape[1]] = t
                lst[i] = grown

    def view(self, layer: int, start: int, end: int) -> tuple[Tensor, Tensor]:
        """K and V of positions [start, end) as [1, Hkv, T, D]."""
        return self.k[layer][None, :, start:end], self.v[layer][None, :, start:end]
