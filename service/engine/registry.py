"""Engine backends, picked by name and imported only when asked for."""

from __future__ import annotations

import importlib
from typing import Any

from service.engine.api import Engine
from service.errors import InvalidArgument

# name -> "module:Class". Importing a backend must not happen before it is chosen.
BACKENDS = {
    "torch": "service.engine.torch_engine:TorchEngine",
    "tensorrt_llm": "service.engine.trtllm_engine:TensorRTLLMEngine",
}


def create_engine(name: str, **kwargs: Any) -> Engine:
    if name not in BACKENDS:
        raise InvalidArgument("backend", f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)
