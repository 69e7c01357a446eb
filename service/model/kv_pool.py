"""The served KV layout: one pool of fixed-size blocks per layer, allocated once, and the prefix cache over it.

Every served sequence's cache is a block table into this pool (`PagedCache`, service/model/cache.py), so a
batched decoder pass reads fixed addresses (a CUDA graph is captured once per bucket and keeps the pool alive) and
a prompt chunk computed once is shared by every request whose prompt starts with the same tokens.

Layout per layer: K and V [Hkv, blocks * BLOCK, D]. Position p of a sequence whose block table is t lives in slot
t[p // BLOCK] * BLOCK + p % BLOCK. Block 0 is the null block: table entries past a sequence's blocks and the
padding rows of a batched pass point at it; what it holds is finite and always masked.

The prefix cache follows vLLM's automatic prefix caching, in chunks of `chunk` tokens (a multiple of BLOCK): once
a prompt is encoded, each of its full chunks is kept under a hash of its tokens and of every token before it, and a
new prompt reuses its longest chain of cached chunks. Prompts are always encoded chunk by chunk (the runner's
prefill), so a reused chunk holds the bits the request would have computed itself: results are the same with the
cache on or off. Blocks are reference-counted (a cached chunk holds its blocks, so does every sequence using
them); chunks that no running sequence uses are evicted least-recently-used when the pool needs blocks and when
the cache holds more than `prefix_bytes`. The pool never grows: admission (service/engine/scheduler.py) keeps the
live sequences' reservations within it, and idle cached chunks are evicted before an allocation could fail.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from service.errors import Unavailable
from service.model.config import ModelConfig

BLOCK = 16  # tokens per block
NULL_BLOCK = 0


@dataclass
class _Chunk:
    blocks: tuple[int, ...]
    users: int = 0  # running sequences that reuse it


@dataclass
class PrefixStats:
    lookups: int = 0  # prompts looked up
    hits: int = 0  # prompts that reused at least one chunk
    tokens_queried: int = 0  # prompt tokens looked up
    tokens_reused: int = 0  # prompt tokens served from the cache
    evictions: int = 0  # chunks evicted


class KVPool:
    def __init__(self, cfg: ModelConfig, num_blocks: int, dtype: torch.dtype, device: torch.device,
                 prefix_bytes: int = 0, chunk: int = 256) -> None:
        if chunk < BLOCK or chunk % BLOCK:
            raise ValueError(f"the prefix chunk must be a positive multiple of {BLOCK} tokens, got {chunk}")
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.num_blocks = max(2, num_blocks)
        self.chunk = chunk
        self.prefix_bytes = max(0, prefix_bytes)
        slots = self.num_blocks * BLOCK
        # Untouched memory on a CPU (no resident pages until a block is first used); zeroed block by block on first
        # use, so a masked read never meets a NaN. On CUDA the pool is the budget's reservation: zeroed at once.
        make = torch.zeros if self.device.type == "cuda" else torch.empty
        self.k = [make(s.num_kv_heads, slots, s.head_dim, dtype=dtype, device=self.device) for s in cfg.layers]
        self.v = [make(s.num_kv_heads, slots, s.head_dim, dtype=dtype, device=self.device) for s in cfg.layers]
        self._touched = [self.device.type == "cuda"] * self.num_blocks
        self._refs = [0] * self.num_blocks
        self._free = list(range(self.num_blocks - 1, NULL_BLOCK, -1))  # pop() hands out 1, 2, 3, ...
        self._zero([NULL_BLOCK])
        self._refs[NULL_BLOCK] = 1  # never handed out
        self._chunks: OrderedDict[bytes, _Chunk] = OrderedDict()  # hash -> chunk, least recently used first
        self._cached_blocks = 0  # blocks the chunks hold
        self.stats = PrefixStats()

    # ---- sizes -------------------------------------------------------------------------------

    def block_bytes(self) -> int:
        return sum(t.shape[0] * BLOCK * t.shape[2] * t.element_size() for t in self.k + self.v)

    def nbytes(self) -> int:
        return self.block_bytes() * self.num_blocks

    def blocks_in_use(self) -> int:
        """Blocks some sequence holds (0 once every request has ended: cached chunks alone do not count)."""
        by_cache = Counter(b for c in self._chunks.values() for b in c.blocks)
        return sum(1 for b in range(1, self.num_blocks) if self._refs[b] > by_cache[b])

    def cached_bytes(self) -> int:
        return self._cached_blocks * self.block_bytes()

    # ---- blocks ------------------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """n blocks, each with one reference; idle cached chunks are evicted (least recently used first) to
        make room. Raises Unavailable when the pool cannot hold them (admission keeps this from happening)."""
        while len(self._free) < n and self._evict_one():
            pass
        if len(self._free) < n:
            raise Unavailable(f"the KV pool is full: {n} blocks asked, {len(self._free)} free of {self.num_blocks}")
        got = [self._free.pop() for _ in range(n)]
        for b in got:
            self._refs[b] = 1
        self._zero([b for b in got if not self._touched[b]])
        return got

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; a block nobody holds is free again."""
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)

    def _zero(self, blocks: list[int]) -> None:
        if not blocks:
            return
        index = torch.tensor([b * BLOCK + i for b in blocks for i in range(BLOCK)], device=self.device)
        for t in self.k + self.v:
            t.index_fill_(1, index, 0)
        for b in blocks:
            self._touched[b] = True

    # ---- prefix cache ------------------------------------------------------------------------

    def chunk_hashes(self, prompt: list[int]) -> list[bytes]:
        """The hash of each full chunk of the prompt, chained: a chunk's hash covers every token before it."""
        out, parent = [], b""
        for start in range(0, len(prompt) - self.chunk + 1, self.chunk):
            parent = hashlib.blake2b(parent + array("q", prompt[start : start + self.chunk]).tobytes(),
                                     digest_size=16).digest()
            out.append(parent)
        return out

    def match(self, prompt: list[int]) -> tuple[list[bytes], list[int]]:
        """The longest chain of cached chunks the prompt starts with: (their hashes, their blocks). Each block gets
        a reference and each chunk a user, for the sequence that takes them (`unuse` gives both back)."""
        if self.prefix_bytes <= 0:
            return [], []
        self.stats.lookups += 1
        self.stats.tokens_queried += len(prompt)
        hashes, blocks = [], []
        for h in self.chunk_hashes(prompt):
            c = self._chunks.get(h)
            if c is None:
                break
            self._chunks.move_to_end(h)
            c.users += 1
            for b in c.blocks:
                self._refs[b] += 1
            hashes.append(h)
            blocks.extend(c.blocks)
        if hashes:
            self.stats.hits += 1
            self.stats.tokens_reused += len(hashes) * self.chunk
        return hashes, blocks

    def unuse(self, hashes: list[bytes]) -> None:
        """A sequence stops using these chunks; idle chunks past the cache's bound are evicted."""
        for h in hashes:
            c = self._chunks.get(h)
            if c is not None:
                c.users -= 1
        self._trim()

    def _trim(self) -> None:
        while self.cached_bytes() > self.prefix_bytes and self._evict_one():
            pass

    def publish(self, prompt: list[int], blocks: list[int]) -> list[bytes]:
        """Keep the full chunks of an encoded prompt (blocks: the sequence's table, from position 0). Returns the
        hashes of the chunks added, each with the publishing sequence as its user (`unuse` when it ends)."""
        if self.prefix_bytes <= 0:
            return []
        per, added = self.chunk // BLOCK, []
        for i, h in enumerate(self.chunk_hashes(prompt)):
            if h in self._chunks:
                continue
            mine = tuple(blocks[i * per : (i + 1) * per])
            for b in mine:
                self._refs[b] += 1
            self._chunks[h] = _Chunk(mine, users=1)
            self._cached_blocks += len(mine)
            added.append(h)
        self._trim()
        return added

    def _evict_one(self) -> bool:
        """Drop the least recently used chunk no running sequence uses; False when there is none."""
        for h, c in self._chunks.items():
            if c.users == 0:
                del self._chunks[h]
                self._cached_blocks -= len(c.blocks)
                self.release(list(c.blocks))
                self.stats.evictions += 1
                return True
        return False

    def slot_index(self, table: Tensor, positions: Tensor) -> Tensor:
        """Slots of positions [..., T] under block tables [..., n] (same leading dims), on the device."""
        return table.gather(-1, positions // BLOCK) * BLOCK + positions % BLOCK
