"""Runners, picked by backend name and imported only when asked for, and the engine over one."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.errors import InvalidArgument

if TYPE_CHECKING:
    from service.engine.local import LocalEngine
    from service.engine.runner import Runner
    from service.engine.scheduler import Limits

# backend -> "module:Class". Importing a backend must not happen before it is chosen.
RUNNERS = {
    "torch": "service.engine.torch_runner:TorchRunner",
    "tensorrt_llm": "service.engine.trtllm_runner:TensorRTLLMRunner",
}


def create_runner(backend: str, **kwargs: Any) -> "Runner":
    if backend not in RUNNERS:
        raise InvalidArgument("backend", f"unknown backend {backend!r}; choose one of {sorted(RUNNERS)}")
    module, cls = RUNNERS[backend].split(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)


def create_engine(backend: str = "torch", *, checkpoint_dir: str | Path, limits: "Limits | None" = None,
                  on_step=None, **runner_kwargs: Any) -> "LocalEngine":
    """The engine for a checkpoint on the backend's runner (device, dtype, threads, tile_rows: the runner's)."""
    from service.engine.local import LocalEngine

    runner = create_runner(backend, checkpoint_dir=checkpoint_dir, **runner_kwargs)
    return LocalEngine(checkpoint_dir, runner, limits, on_step)
