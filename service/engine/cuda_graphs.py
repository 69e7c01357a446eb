"""CUDA graphs of the decoder pass, keyed by batch bucket and key-length bucket. UNVERIFIED: no GPU has run this
project yet.

Every served cache is a block table into the runner's KVPool, allocated once, so a graph reads fixed addresses
whatever requests it serves: it is keyed by (batch bucket, key-length bucket) alone and captured once. A batch of B
canvases is padded to its bucket (1, 2, 4, ..., 64): padding rows have length 0 and a table of null blocks, and
their outputs are dropped. The key length is the batch's longest cache plus a canvas, rounded up to a power of two
(at least KV_BUCKET_MIN), so joins, leaves and commits only change what goes into the static inputs: canvas, soft
input, block tables and lengths, copied in on the device before each replay (no host read). A graph holds its
static inputs and the pool it reads (`_Graph.buffers`), so none of them can be freed or reused under it. All graphs
share one memory pool for their activations: they replay one at a time on the scheduler's thread, and each
replay writes its activations before reading them. A capture that fails (a kernel that syncs with the host, say)
is logged once and that bucket runs eagerly from then on: a graph never fails a request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from service.model.kv_pool import BLOCK, NULL_BLOCK, KVPool

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
KV_BUCKET_MIN = 1024  # tokens: the shortest key length a graph is captured for
# decode_paged(canvas [B, L], soft [B, L, H] | None, pool, table [B, n], lengths [B], kv_len) -> hidden [B, L, H]
DecodePaged = Callable[[Tensor, Tensor | None, KVPool, Tensor, Tensor, int], Tensor]
# capture(fn) -> (replay, out): runs fn under capture; replay() re-runs it, writing into out.
Capture = Callable[[Callable[[], Tensor]], tuple[Callable[[], None], Tensor]]


def bucket_for(batch: int) -> int | None:
    """The smallest bucket that holds `batch` canvases; None past the largest (eager)."""
    return next((b for b in BUCKETS if b >= batch), None)


def kv_bucket_for(tokens: int) -> int:
    """The key length a graph reads for a batch whose longest cache plus canvas is `tokens`."""
    n = KV_BUCKET_MIN
    while n < tokens:
        n *= 2
    return n


def cuda_capture(fn: Callable[[], Tensor], pool: object = None) -> tuple[Callable[[], None], Tensor]:
    """Capture fn() as a CUDA graph after warm-up runs on a side stream, as torch.cuda.graphs advises."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph.replay, out


def shared_pool_capture() -> Capture:
    """cuda_capture with one memory pool shared by every graph it captures."""
    pool = torch.cuda.graph_pool_handle()
    return lambda fn: cuda_capture(fn, pool)


def fill_tables(table: Tensor, lengths: Tensor, caches: list) -> None:
    """Block tables and lengths of the batch into [rows, n] and [rows] buffers on the device (device-to-device
    copies, no host read); rows past the batch are padding: null blocks, length 0."""
    table.fill_(NULL_BLOCK)
    lengths.zero_()
    width = table.shape[1]
    for r, c in enumerate(caches):
        n = min(width, c.table.shape[0])
        table[r, :n].copy_(c.table[:n])
        lengths[r : r + 1].copy_(c.length_t)


def paged_decode(decode: DecodePaged, pool: KVPool, canvas: Tensor, soft: Tensor | None, caches: list,
                 kv_len: int | None = None) -> Tensor:
    """The batched, padded decoder pass run eagerly (what a graph replays), for caches of `pool`."""
    b, length = canvas.shape
    kv_len = kv_len or kv_bucket_for(max(c.length for c in caches) + length)
    table = torch.empty(b, kv_len // BLOCK, dtype=torch.long, device=canvas.device)
    lengths = torch.empty(b, dtype=torch.long, device=canvas.device)
    fill_tables(table, lengths, caches)
    return decode(canvas, soft, pool, table, lengths, kv_len)


@dataclass
class _Graph:
    canvas: Tensor  # [bucket, L] static input
    soft: Tensor  # [bucket, L, H] static input
    table: Tensor  # [bucket, kv_len / BLOCK] static input
    lengths: Tensor  # [bucket] static input
    replay: Callable[[], None]
    out: Tensor  # [bucket, L, H] static output
    buffers: tuple  # everything the graph reads: the static inputs and the KV pool's tensors


class DecoderGraphs:
    def __init__(self, decode: DecodePaged, pool: KVPool, canvas_length: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device, capture: Capture | None = None) -> None:
        self._decode = decode
        self._pool = pool
        self._shape = (canvas_length, hidden_size)
        self._dtype, self._device = dtype, device
        self._capture = capture if capture is not None else shared_pool_capture()
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._eager_buckets: set[int] = set()
        self.captures = 0
        self.replays = 0

    def decode(self, canvas: Tensor, soft: Tensor | None, caches: list) -> Tensor:
        """decode(canvas [B, L], soft [B, L, H] | None, caches: PagedCaches of this pool) -> hidden [B, L, H]."""
        b, length = canvas.shape
        bucket = bucket_for(b)
        kv_len = kv_bucket_for(max(c.length for c in caches) + length)
        if bucket is None or bucket in self._eager_buckets:
            return self._eager(canvas, soft, caches, kv_len)
        key = (bucket, kv_len)
        graph = self._graphs.get(key) or self._new_graph(bucket, kv_len)
        if graph is None:
            return self._eager(canvas, soft, caches, kv_len)
        graph.canvas[:b].copy_(canvas)
        if soft is None:
            graph.soft[:b].zero_()
        else:
            graph.soft[:b].copy_(soft)
        fill_tables(graph.table, graph.lengths, caches)
        graph.replay()
        self.replays += 1
        return graph.out[:b]

    def _eager(self, canvas: Tensor, soft: Tensor | None, caches: list, kv_len: int) -> Tensor:
        return paged_decode(self._decode, self._pool, canvas, soft, caches, kv_len)

    def _new_graph(self, bucket: int, kv_len: int) -> _Graph | None:
        length, hidden = self._shape
        dev = self._device
        canvas = torch.zeros(bucket, length, dtype=torch.long, device=dev)
        soft = torch.zeros(bucket, length, hidden, dtype=self._dtype, device=dev)
        table = torch.full((bucket, kv_len // BLOCK), NULL_BLOCK, dtype=torch.long, device=dev)
        lengths = torch.zeros(bucket, dtype=torch.long, device=dev)
        pool = self._pool
        try:
            replay, out = self._capture(lambda: self._decode(canvas, soft, pool, table, lengths, kv_len))
        except Exception as e:  # a kernel that cannot be captured: this bucket runs eagerly from now on
            log.warning("CUDA graph capture failed for %d canvases (%s: %s); running that bucket eagerly",
                        bucket, type(e).__name__, e)
            self._eager_buckets.add(bucket)
            return None
        self.captures += 1
        graph = _Graph(canvas, soft, table, lengths, replay, out, (canvas, soft, table, lengths, *pool.k, *pool.v))
        self._graphs[(bucket, kv_len)] = graph
        return graph
