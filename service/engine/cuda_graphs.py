"""CUDA graphs of the decoder pass, per batch bucket. UNVERIFIED: no GPU has run this project yet.

A batch of B canvases is padded to its bucket (1, 2, 4, 8, 16, 32, 64): padding rows repeat the first
row's cache (decoder mode only reads caches) and their outputs are dropped. A graph bakes in the
addresses and lengths of its caches, so it is keyed by the bucket and the batch's (cache, length) list,
captured the second time in a row a key is seen (a batch that changes every step never pays for a
capture), and replayed while the batch stays the same: between commits, a canvas's 16-48 steps. The
two most recent graphs are kept: each holds a private memory pool for its activations (graphs replayed
in any order cannot share one safely). A capture that fails (a kernel that syncs with the host, say) is
logged once and that bucket runs eagerly from then on: a graph never fails a request.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
Decode = Callable[[Tensor, Tensor | None, list], Tensor]
# capture(fn) -> (replay, out): runs fn under capture; replay() re-runs it, writing into out.
Capture = Callable[[Callable[[], Tensor]], tuple[Callable[[], None], Tensor]]


def bucket_for(batch: int) -> int | None:
    """The smallest bucket that holds `batch` canvases; None past the largest (eager)."""
    return next((b for b in BUCKETS if b >= batch), None)


def cuda_capture(fn: Callable[[], Tensor]) -> tuple[Callable[[], None], Tensor]:
    """Capture fn() as a CUDA graph after warm-up runs on a side stream, as torch.cuda.graphs advises."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


@dataclass
class _Graph:
    canvas: Tensor  # [bucket, L] static input
    soft: Tensor  # [bucket, L, H] static input
    replay: Callable[[], None]
    out: Tensor  # [bucket, L, H] static output


class DecoderGraphs:
    def __init__(self, decode: Decode, canvas_length: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device, capture: Capture = cuda_capture, max_graphs: int = 2) -> None:
        self._decode = decode
        self._shape = (canvas_length, hidden_size)
        self._dtype, self._device = dtype, device
        self._capture = capture
        self._max = max_graphs
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._last_key: tuple | None = None
        self._eager_buckets: set[int] = set()
        self.captures = 0
        self.replays = 0

    def decode(self, canvas: Tensor, soft: Tensor | None, caches: list) -> Tensor:
        """The same as decode(canvas [B, L], soft [B, L, H] | None, caches) -> hidden [B, L, H]."""
        b = canvas.shape[0]
        bucket = bucket_for(b)
        if bucket is None or bucket in self._eager_buckets:
            return self._decode(canvas, soft, caches)
        padded = caches + [caches[0]] * (bucket - b)
        key = (bucket, tuple((id(c), c.length, c.k[0].data_ptr()) for c in padded))
        graph = self._graphs.get(key)
        if graph is None:
            if key != self._last_key:  # capture only a batch that repeats
                self._last_key = key
                return self._decode(canvas, soft, caches)
            graph = self._new_graph(bucket, padded, key)
            if graph is None:
                return self._decode(canvas, soft, caches)
        self._graphs.move_to_end(key)
        graph.canvas[:b].copy_(canvas)
        if soft is None:
            graph.soft[:b].zero_()
        else:
            graph.soft[:b].copy_(soft)
        graph.replay()
        self.replays += 1
        return graph.out[:b]

    def _new_graph(self, bucket: int, caches: list, key: tuple) -> _Graph | None:
        length, hidden = self._shape
        canvas = torch.zeros(bucket, length, dtype=torch.long, device=self._device)
        soft = torch.zeros(bucket, length, hidden, dtype=self._dtype, device=self._device)
        try:
            replay, out = self._capture(lambda: self._decode(canvas, soft, caches))
        except Exception as e:  # a kernel that cannot be captured: this bucket runs eagerly from now on
            log.warning("CUDA graph capture failed for %d canvases (%s: %s); running that bucket eagerly",
                        bucket, type(e).__name__, e)
            self._eager_buckets.add(bucket)
            return None
        self.captures += 1
        graph = _Graph(canvas, soft, replay, out)
        self._graphs[key] = graph
        while len(self._graphs) > self._max:
            self._graphs.popitem(last=False)
        return graph
