"""The KV cache of one sequence: encoder mode writes it, decoder mode reads it. Owned by the caller.

Slot i holds the keys and values of absolute position i, so `length` is all a mask needs. Decoder mode writes
its canvas's keys and values to the slots past `length` (`view_with`), which the commit's encoder pass
overwrites: the visible prefix and the canvas are then one view, with no concatenation per layer per step.
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

    def view_with(self, layer: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """K and V of positions [start, length) followed by k, v [Hkv, L, D], as views [1, Hkv, T + L, D].

        k and v go to slots [length, length + L), past the cache's length (`length` does not move)."""
        end = self.length + k.shape[1]
        self.reserve(end)
        self.k[layer][:, self.length : end] = k
        self.v[layer][:, self.length : end] = v
        return self.view(layer, start, end)
