"""The torch runner: our DiffusionGemma network, float32 or bfloat16, on a CPU or a CUDA device.

On CUDA, decoder passes are replayed from CUDA graphs (service/engine/cuda_graphs.py). UNVERIFIED on a
GPU: no GPU machine has run this project yet (docs/benchmarks.md says what has been measured where).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from service.engine.cuda_graphs import DecoderGraphs
from service.engine.runner import CanvasStep, StepOutput, denoise
from service.errors import InvalidArgument, Unavailable
from service.model.cache import KVCache
from service.model.config import ModelConfig
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
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        if tile_rows is not None and (isinstance(tile_rows, bool) or not isinstance(tile_rows, int) or tile_rows < 1):
            raise InvalidArgument("tile_rows", f"must be a positive integer, got {tile_rows!r}")
        config, model = load_model(checkpoint_dir, dtype=dtype, device=check_device(device))
        model.batch_invariant = batch_invariant  # opt-in: ids equal a solo run's; default one expert GEMM per batch
        self._setup(config, model, tile_rows, cuda_graphs)

    @classmethod
    def from_model(cls, config: ModelConfig, model: DiffusionGemma, tile_rows: int | None = None,
                   cuda_graphs: bool = True, fixed_tile: bool | None = None) -> "TorchRunner":
        """A runner over a network already in memory (benchmarks at the real shape with random weights).
        fixed_tile: None for the device's default (see _setup)."""
        runner = cls.__new__(cls)
        runner._setup(config, model.eval(), tile_rows, cuda_graphs, fixed_tile)
        return runner

    def _setup(self, config: ModelConfig, model: DiffusionGemma, tile_rows: int | None, cuda_graphs: bool,
               fixed_tile: bool | None = None) -> None:
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
        use_graphs = cuda_graphs and self.device.type == "cuda"
        self.graphs = DecoderGraphs(model.decode, config.canvas_length, config.hidden_size, self.dtype,
                                    self.device) if use_graphs else None

    def describe(self) -> str:
        graphs = ", CUDA graphs" if self.graphs is not None else ""
        invariant = ", batch-invariant" if self.model.batch_invariant else ""
        return f"torch {str(self.dtype).removeprefix('torch.')} on {self.device.type}{graphs}{invariant}"

    def new_cache(self, capacity: int) -> KVCache:
        return self.model.new_cache(capacity)

    def new_generator(self, seed: int) -> torch.Generator:
        # meta tensors have no generator of their own; their draws take a CPU one (and make no data)
        gen = torch.Generator(device=self.device) if self.device.type != "meta" else torch.Generator()
        return gen.manual_seed(seed)

    @torch.no_grad()
    def prefill(self, rows: list[Tensor], caches: list[KVCache]) -> None:
        counts = [r.numel() for r in rows]
        ids = torch.zeros(len(rows), max(counts), dtype=torch.long, device=self.device)  # [B, T]
        for i, r in enumerate(rows):
            ids[i, : r.numel()] = r
        self.model.encode(ids, counts, caches)

    @torch.no_grad()
    def step(self, canvases: list[CanvasStep]) -> StepOutput:
        canvas = torch.stack([c.canvas for c in canvases])  # [B, L]
        soft = None
        if any(c.soft is not None for c in canvases):
            zero = torch.zeros(self.config.canvas_length, self.config.hidden_size, dtype=self.dtype, device=self.device)
            soft = torch.stack([c.soft if c.soft is not None else zero for c in canvases])  # [B, L, H]
        caches = [c.cache for c in canvases]
        if self.graphs is not None:
            hidden = self.graphs.decode(canvas, soft, caches)
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
