"""KV caches: encoder mode writes them, decoder mode reads them. Owned by the caller.

Both layouts give position i of a sequence one slot, so `length` is all a mask needs, and share one interface:
`reserve(end)`, `write(layer, start, k, v)`, `read(layer, lo, end)`. Decoder mode writes its canvas's keys and
values to the positions past `length`, which the commit's encoder pass overwrites.

- KVCache: one sequence's own tensors, grown as needed (tools, tests, the build's verification).
- PagedCache: a sequence's block table into the runner's preallocated KVPool (service/model/kv_pool.py): the
  layout served requests use, which batched passes and CUDA graphs read by table, and the prefix cache shares.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from service.model.config import ModelConfig
from service.model.kv_pool import BLOCK, KVPool


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

    def write(self, layer: int, start: int, k: Tensor, v: Tensor) -> None:
        """k, v [Hkv, T, D] into positions [start, start + T)."""
        self.reserve(start + k.shape[1])
        self.k[layer][:, start : start + k.shape[1]] = k
        self.v[layer][:, start : start + v.shape[1]] = v

    def read(self, layer: int, lo: int, end: int) -> tuple[Tensor, Tensor]:
        """K and V of positions [lo, end) as [1, Hkv, T, D] (views)."""
        return self.k[layer][None, :, lo:end], self.v[layer][None, :, lo:end]


class PagedCache:
    """One sequence's blocks in a KVPool: the first `reused` positions may be cached prompt chunks shared with other
    sequences (read only); the rest are its own. Every block is reserved at creation, so a running sequence never
    waits for memory. `release()` (or garbage collection) gives the blocks back."""

    def __init__(self, pool: KVPool, blocks: list[int], reused: int, chunks: list[bytes],
                 prompt: list[int] | None) -> None:
        self.pool = pool
        self.blocks = blocks
        self.table = torch.tensor(blocks, dtype=torch.long, device=pool.device)  # [n] device copy, made once
        self.length_t = torch.zeros(1, dtype=torch.long, device=pool.device)  # [1] `length` on the device
        self._slots: dict[tuple[int, int], Tensor] = {}  # (lo, end) -> slots [T], for the current length
        self._length = 0
        self.length = reused
        self.reused = reused  # prompt tokens served from the prefix cache
        self.prompt = prompt  # published to the prefix cache once encoded (None: nothing to publish)
        self._held = {"blocks": list(blocks), "chunks": list(chunks)}
        self._finalizer = weakref.finalize(self, _give_back, pool, self._held)

    @property
    def length(self) -> int:
        return self._length

    @length.setter
    def length(self, n: int) -> None:
        if n != self._length:
            self._length = n
            self.length_t.fill_(n)  # a fill kernel with a host scalar: no host-to-device copy, no sync
            self._slots.clear()

    @property
    def capacity(self) -> int:
        return len(self.blocks) * BLOCK

    def nbytes(self) -> int:
        return len(self.blocks) * self.pool.block_bytes()

    def reserve(self, needed: int) -> None:
        if needed > self.capacity:
            raise RuntimeError(f"a sequence needs {needed} KV positions but reserved {self.capacity}")

    def slots(self, lo: int, end: int) -> Tensor:
        """Pool slots of positions [lo, end), on the device (memoised while the length stays)."""
        key = (lo, end)
        if key not in self._slots:
            positions = torch.arange(lo, end, device=self.table.device)
            self._slots[key] = self.pool.slot_index(self.table, positions)
        return self._slots[key]

    def write(self, layer: int, start: int, k: Tensor, v: Tensor) -> None:
        """k, v [Hkv, T, D] into positions [start, start + T)."""
        end = start + k.shape[1]
        self.reserve(end)
        slots = self.slots(start, end)
        self.pool.k[layer].index_copy_(1, slots, k)
        self.pool.v[layer].index_copy_(1, slots, v)

    def read(self, layer: int, lo: int, end: int) -> tuple[Tensor, Tensor]:
        """K and V of positions [lo, end) as [1, Hkv, T, D] (gathered copies)."""
        slots = self.slots(lo, end)
        return self.pool.k[layer].index_select(1, slots)[None], self.pool.v[layer].index_select(1, slots)[None]

    def publish(self) -> None:
        """Offer the encoded prompt's full chunks to the prefix cache (once)."""
        if self.prompt is not None and self.length >= len(self.prompt):
            self._held["chunks"] += self.pool.publish(self.prompt, self.blocks)
            self.prompt = None

    def release(self) -> None:
        self._finalizer()


def _give_back(pool: KVPool, held: dict) -> None:
    pool.unuse(held["chunks"])
    pool.release(held["blocks"])
    held["chunks"], held["blocks"] = [], []
