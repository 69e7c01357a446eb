"""Shared set-up for the CPU benchmarks: the "small" random DiffusionGemma, saved by transformers."""

from __future__ import annotations

import platform
import tempfile
import time
from pathlib import Path

import torch

SMALL_TEXT = dict(
    vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, global_head_dim=64, num_global_key_value_heads=1, sliding_window=1024,
    layer_types=["sliding_attention"] * 5 + ["full_attention"], num_experts=8, top_k_experts=2,
    moe_intermediate_size=256,
)
VISION = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=2, head_dim=8)
CANVAS, PROMPT, STEPS = 256, 64, 16
NO_EARLY_STOP = 1e-12  # the reference refuses 0; nothing reaches this mean entropy


def small_checkpoint(seed: int = 0) -> tuple[object, Path]:
    """The reference model (random weights) and the directory it was saved to."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    cfg = DiffusionGemmaConfig(text_config=dict(SMALL_TEXT), vision_config=dict(VISION), canvas_length=CANVAS)
    torch.manual_seed(seed)
    ref = DiffusionGemmaForBlockDiffusion(cfg).eval()
    path = Path(tempfile.mkdtemp(prefix="dgemma-bench-"))
    ref.save_pretrained(path)
    return ref, path


def best_time(fn, repeats: int) -> float:
    """The shortest of `repeats` wall-clock runs of fn(), in seconds."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def machine() -> dict:
    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def percentile(xs: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(xs), q))


class Serve:
    """`dgemma serve` (the embedded model) on 127.0.0.1 with free ports, for the front benchmarks; stopped
    with SIGTERM on exit."""

    def __init__(self, threads: int = 1, env: dict[str, str] | None = None) -> None:
        import os
        import subprocess
        import sys

        from service.triton.launcher import free_port

        self.port, self.http_port, self.triton_port = free_port(), free_port(), free_port()
        self.metrics_port, self.triton_metrics_port = free_port(), free_port()
        cache = Path(tempfile.mkdtemp(prefix="dgemma-bench-"))
        self.log = cache / "serve.log"  # the server's stderr: its log lines
        full_env = {**os.environ, "NIM_CACHE_PATH": str(cache),
                    "OMP_NUM_THREADS": str(threads), "NIM_TRITON_GRPC_PORT": str(self.triton_port),
                    "NIM_TRITON_METRICS_PORT": str(self.triton_metrics_port), "NIM_LOG_LEVEL": "WARNING",
                    **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--http-port", str(self.http_port), "--metrics-port", str(self.metrics_port), "--threads", str(threads)],
            env=full_env, stdout=subprocess.PIPE, stderr=open(self.log, "wb"), text=True)

    def __enter__(self) -> "Serve":
        line = self.proc.stdout.readline()
        if "dgemma: serving" not in line:
            self.__exit__()
            raise RuntimeError(f"dgemma serve did not start: {line!r}")
        return self

    def __exit__(self, *exc) -> None:
        import signal

        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
