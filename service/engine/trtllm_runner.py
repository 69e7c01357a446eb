"""TensorRT-LLM runner. UNVERIFIED: TensorRT-LLM cannot be installed on this project's machines.

It exists so that the registry can name it and fail with a clear message; it never falls back silently.
"""

from __future__ import annotations

from typing import Any

from service.errors import Unavailable


class TensorRTLLMRunner:
    name = "tensorrt_llm"

    def __init__(self, **_: Any) -> None:
        try:
            import tensorrt_llm  # noqa: F401
        except ImportError:
            raise Unavailable(
                "backend 'tensorrt_llm' needs the tensorrt_llm package (NGC container); it is not installed. "
                "Use backend 'torch'."
            ) from None
        raise Unavailable("backend 'tensorrt_llm' is not implemented yet (unverified); use backend 'torch'")
