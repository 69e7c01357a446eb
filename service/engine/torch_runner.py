"""The torch runner: our DiffusionGemma network, float32 or bfloat16, on a CPU or a CUDA device.

On CUDA, decoder passes are replayed from CUDA graphs (service/engine/cuda_graphs.py). UNVERIFIED on a
GPU: no GPU machine has run this project yet (docs/benchmarks.md says what has been measured where).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from service.engine.cuda_graphs import DecoderGraphs, paged_decode
from service.engine.runner import CanvasStep, StepOutput, denoise
from service.errors import InvalidArgument, Unavailable
from service.model.cache import PagedCache
from service.model.config import ModelConfig
from service.model.kv_pool import BLOCK, KVPool
from service.model.loading import load_model
from service.model.network import DiffusionGemma
from service.sampler.tiles import Vocab, step_tile_rows, tile_bytes, tile_rows_for


def check_device(device: str | torch.device) -> torch.device:
    """The device, or a clear error when this machine cannot run on it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidArgument("device", f"not a torch device: {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Unavailable("device 'cuda' was asked for, but this torch build or machine has no CUDA device "
                          f"(torch {torch.__version__}); use device 'cpu'")
    if dev.type not in ("cpu", "cuda", "meta"):
        raise InvalidArgument("device", f"the torch runner runs on cpu or cuda, got {dev.type!r}")
    return dev


DEFAULT_CHUNK = 256  # tokens per prefix-cache chunk (NIM_PREFIX_CHUNK_TOKENS)


class TorchRunner:
    name = "torch"

    def __init__(
        self,
        checkpoint_dir: str | Path,
        device: str = "cpu",
        dtype: str | None = None,
        threads: int | None = None,
        tile_rows: int | None = None,
        cuda_graphs: bool = True,
        batch_invariant: bool = False,
        prefix_cache_bytes: int | None = None,
        prefix_chunk: int = DEFAULT_CHUNK,
        batched_attention: bool | None = None,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        if tile_rows is not None and (isinstance(tile_rows, bool) or not isinstance(tile_rows, int) or tile_rows < 1):
            raise InvalidArgument("tile_rows", f"must be a positive integer, got {tile_rows!r}")
        config, model = load_model(checkpoint_dir, dtype=dtype, device=check_device(device))
        model.batch_invariant = batch_invariant  # opt-in: ids equal a solo run's; default one expert GEMM per batch
        self._setup(config, model, tile_rows, cuda_graphs, prefix_cache_bytes, prefix_chunk, batched_attention)

    @classmethod
    def from_model(cls, config: ModelConfig, model: DiffusionGemma, tile_rows: int | None = None,
                   cuda_graphs: bool = True, prefix_cache_bytes: int | None = None,
                   prefix_chunk: int = DEFAULT_CHUNK, batched_attention: bool | None = None,
                   fixed_tile: bool | None = None) -> "TorchRunner":
        """A runner over a network already in memory (benchmarks at the real shape with random weights).
        fixed_tile: None for the device's default (see _setup)."""
        runner = cls.__new__(cls)
        runner._setup(config, model.eval(), tile_rows, cuda_graphs, prefix_cache_bytes, prefix_chunk,
                      batched_attention, fixed_tile)
        return runner

    def _setup(self, config: ModelConfig, model: DiffusionGemma, tile_rows: int | None, cuda_graphs: bool,
               prefix_cache_bytes: int | None, prefix_chunk: int, batched_attention: bool | None,
               fixed_tile: bool | None = None) -> None:
        for name, v, lo in (("prefix_cache_bytes", prefix_cache_bytes, 0), ("prefix_chunk", prefix_chunk, BLOCK)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
                raise InvalidArgument(name, f"must be an integer >= {lo}, got {v!r}")
        if prefix_chunk % BLOCK:
            raise InvalidArgument("prefix_chunk", f"must be a multiple of {BLOCK} tokens, got {prefix_chunk}")
        self.config, self.model = config, model
        self.device, self.dtype = model.device, model.dtype
        # Sampler tiles (service/sampler/tiles.py): fixed one-canvas tiles keep a canvas's bits independent of its
        # batch (a CPU, the batch-invariant mode); a GPU in throughput mode grows a step's tile with its rows, up
        # to what 10% of the card holds. UNVERIFIED on a GPU.
        cuda = self.device.type == "cuda"
        self.fixed_tile = (not cuda or model.batch_invariant) if fixed_tile is None else fixed_tile
        memory = torch.cuda.get_device_properties(self.device).total_memory if cuda else None
        self.tile_rows = tile_rows or tile_rows_for(config.canvas_length, config.vocab_size, memory,
                                                    grow=not self.fixed_tile)
        self._vocab = Vocab(model.logits, model.soft_embedding)
        self._use_graphs = cuda_graphs and self.device.type == "cuda"
        # The batched, padded attention of decode_paged (what graphs replay); default on CUDA. Off: row by row over
        # exactly the visible keys, each row's bits its solo pass's (the CPU default; the reference parity tests).
        self._batched = self.device.type == "cuda" if batched_attention is None else batched_attention
        self._prefix_bytes, self._chunk = prefix_cache_bytes, prefix_chunk
        self.pool: KVPool | None = None
        self.graphs: DecoderGraphs | None = None

    def describe(self) -> str:
        graphs = ", CUDA graphs" if self._use_graphs else ", batched attention" if self._batched else ""
        invariant = ", batch-invariant" if self.model.batch_invariant else ""
        return f"torch {str(self.dtype).removeprefix('torch.')} on {self.device.type}{graphs}{invariant}"

    def reserve_kv(self, kv_bytes: int, max_blocks: int | None = None) -> KVPool:
        """Allocate the KV pool once: kv_bytes (at most max_blocks blocks), of which the prefix cache may keep
        NIM_PREFIX_CACHE_BYTES idle (default a tenth). Caches made before this get a pool of the default budget."""
        if self.pool is not None:
            raise RuntimeError("the KV pool is already allocated")
        block_bytes = BLOCK * self.kv_bytes_per_token()
        blocks = max(2, kv_bytes // block_bytes)
        if max_blocks is not None:
            blocks = min(blocks, max_blocks)
        prefix = blocks * block_bytes // 10 if self._prefix_bytes is None else self._prefix_bytes
        self.pool = KVPool(self.config, blocks, self.dtype, self.device, prefix, self._chunk)
        if self._use_graphs:
            self.graphs = DecoderGraphs(self.model.decode_paged, self.pool, self.config.canvas_length,
                                        self.config.hidden_size, self.dtype, self.device)
        return self.pool

    def new_cache(self, capacity: int, prompt: list[int] | None = None) -> PagedCache:
        """A cache reserving `capacity` positions in the pool; with `prompt`, its longest cached chunk prefix is
        shared (`reused` positions, already encoded) and its full chunks are offered to the prefix cache once
        encoded."""
        if self.pool is None:
            self.reserve_kv(self.default_memory_budget())
        pool = self.pool
        hashes, shared = pool.match(prompt) if prompt else ([], [])
        reused = len(shared) * BLOCK
        try:
            own = pool.allocate(max(0, -(-max(1, capacity) // BLOCK) - len(shared)))
        except Exception:
            pool.unuse(hashes)
            pool.release(shared)
            raise
        return PagedCache(pool, shared + own, reused, hashes, prompt)

    def prefix_stats(self) -> dict:
        """The prefix cache's counters (empty before the pool exists)."""
        if self.pool is None:
            return {}
        s = self.pool.stats
        return {"lookups": s.lookups, "hits": s.hits, "tokens_queried": s.tokens_queried,
                "tokens_reused": s.tokens_reused, "evictions": s.evictions, "bytes": self.pool.cached_bytes()}

    def new_generator(self, seed: int) -> torch.Generator:
        # meta tensors have no generator of their own; their draws take a CPU one (and make no data)
        gen = torch.Generator(device=self.device) if self.device.type != "meta" else torch.Generator()
        return gen.manual_seed(seed)

    @torch.no_grad()
    def prefill(self, rows: list[Tensor], caches: list[PagedCache]) -> None:
        """Encoder passes, row after row. A prompt is encoded chunk by chunk at multiples of the prefix chunk, cached
        or not, so a chunk reused from the prefix cache holds the bits this request would have computed."""
        for r, cache in zip(rows, caches):
            prompt_end = len(cache.prompt) if cache.prompt is not None else 0
            start, done = cache.length, 0
            while done < r.numel():
                end = start + r.numel() - done
                if start < prompt_end:  # up to the next chunk boundary
                    end = min(end, (start // self._chunk + 1) * self._chunk)
                self.model.encode(r[None, done : done + end - start], [end - start], [cache])
                done, start = done + end - start, end
            cache.publish()

    @torch.no_grad()
    def step(self, canvases: list[CanvasStep]) -> StepOutput:
        canvas = torch.stack([c.canvas for c in canvases])  # [B, L]
        soft = None
        if any(c.soft is not None for c in canvases):
            zero = torch.zeros(self.config.canvas_length, self.config.hidden_size, dtype=self.dtype, device=self.device)
            soft = torch.stack([c.soft if c.soft is not None else zero for c in canvases])  # [B, L, H]
        caches = [c.cache for c in canvases]
        paged = all(isinstance(c, PagedCache) and c.pool is self.pool for c in caches)
        if self.graphs is not None and paged:
            hidden = self.graphs.decode(canvas, soft, caches)
        elif self._batched and paged:
            hidden = paged_decode(self.model.decode_paged, self.pool, canvas, soft, caches)
        else:
            hidden = self.model.decode(canvas, soft, caches)  # [B, L, H]
        return denoise(self._vocab, hidden, canvases, self.tile_rows, self.config.vocab_size, self.fixed_tile)

    def kv_bytes_per_token(self) -> int:
        size = torch.tensor([], dtype=self.dtype).element_size()
        return sum(2 * spec.num_kv_heads * spec.head_dim for spec in self.config.layers) * size

    def default_memory_budget(self) -> int:
        """2 GiB on a CPU; on a GPU, 85% of the memory free once the weights are loaded."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # UNVERIFIED on a GPU: freed load-time blocks count as free, not as cached
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(0.85 * free)
        return 2 << 30

    def step_bytes(self, canvases: int) -> int:
        """An upper estimate: one vocabulary tile (this step's: min(tile_rows, its rows) unless fixed), plus per
        canvas the decoder's widest activations of one layer (attention scores over canvas and cache are not
        counted: SDPA computes them blockwise)."""
        cfg = self.config
        size = torch.tensor([], dtype=self.dtype).element_size()
        widest = max(cfg.intermediate_size, 2 * cfg.moe_intermediate_size * cfg.top_k_experts,
                     cfg.num_heads * max(s.head_dim for s in cfg.layers))
        per_canvas = cfg.canvas_length * (8 * cfg.hidden_size + 3 * widest) * size
        tile = step_tile_rows(self.tile_rows, canvases * cfg.canvas_length, self.fixed_tile)
        return tile_bytes(tile, cfg.vocab_size) + canvases * per_canvas
