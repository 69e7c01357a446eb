"""Render the Triton model repository (config.pbtxt from its template, model.py copied) into a directory."""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from string import Template

from service.errors import InvalidArgument

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "model_repository" / "diffusiongemma"
MODEL_NAME = "diffusiongemma"


@dataclass(frozen=True)
class RepositorySettings:
    checkpoint_dir: str
    engine_backend: str = "torch"
    device: str = "cpu"
    dtype: str = ""
    instance_kind: str = "KIND_CPU"  # KIND_GPU on GPUs
    max_queue_size: int = 64
    queue_timeout_us: int = 0  # 0: no queue timeout
    max_live_canvases: int = 16
    max_engine_queue: int = 64
    max_memory_bytes: int = 0  # KV caches plus a step's transient buffers; 0: the runner's default
    max_prompt_tokens: int = 8192
    max_request_seconds: float = 0  # a request's longest run in the engine; 0: no cap
    max_new_tokens_limit: int = 0  # refused above these (INVALID_ARGUMENT); 0: the API's own maxima
    max_denoising_steps_limit: int = 0
    engine_step_timeout: float = 120.0  # a denoising step running longer is hung: the heartbeat stops; 0: no limit
    tile_rows: int = 0  # rows of the sampler's vocabulary tiles; 0: the runner's default for its device
    threads: int = 0
    batch_invariant: int = 0  # 1: a request's ids equal its solo run's (per-canvas expert GEMMs); 0: throughput
    prefix_cache_bytes: int = -1  # idle prompt chunks the KV pool keeps; -1: a tenth of the pool; 0: off
    prefix_chunk_tokens: int = 256  # tokens per prefix-cache chunk (a prompt is encoded chunk by chunk)
    model_name: str = MODEL_NAME

    def validate(self) -> "RepositorySettings":
        if self.instance_kind not in ("KIND_CPU", "KIND_GPU"):
            raise InvalidArgument("instance_kind", "must be KIND_CPU or KIND_GPU")
        for name in ("max_queue_size", "max_live_canvases", "max_engine_queue", "max_prompt_tokens"):
            if int(getattr(self, name)) < 1:
                raise InvalidArgument(name, "must be >= 1")
        if self.prefix_cache_bytes < -1:
            raise InvalidArgument("prefix_cache_bytes", "must be >= 0 (or -1: the default)")
        if self.prefix_chunk_tokens < 16 or self.prefix_chunk_tokens % 16:
            raise InvalidArgument("prefix_chunk_tokens", "must be a positive multiple of 16")
        for name in ("tile_rows", "max_memory_bytes", "max_request_seconds", "max_new_tokens_limit",
                     "max_denoising_steps_limit", "engine_step_timeout"):
            if getattr(self, name) < 0:
                raise InvalidArgument(name, "must be >= 0")
        if '"' in self.checkpoint_dir or "\n" in self.checkpoint_dir:
            raise InvalidArgument("checkpoint_dir", "must not contain quotes or newlines")
        return self


def render_config(settings: RepositorySettings) -> str:
    template = Template((TEMPLATE_DIR / "config.pbtxt.template").read_text())
    return template.substitute({k: str(v) for k, v in asdict(settings.validate()).items()})


def build_repository(dst: Path, settings: RepositorySettings) -> Path:
    """Write <dst>/<model>/config.pbtxt and <dst>/<model>/1/model.py; returns dst."""
    model_dir = Path(dst) / settings.model_name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(render_config(settings))
    shutil.copy2(TEMPLATE_DIR / "1" / "model.py", model_dir / "1" / "model.py")
    return Path(dst)
