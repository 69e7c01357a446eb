"""Whether a quantized runtime's kernels can run on a device: one check for the FP8 and NVFP4 runtimes."""

from __future__ import annotations

import torch


def native_reason(device: torch.device | str, what: str, min_capability: tuple[int, int], generation: str,
                  missing: list[str]) -> str | None:
    """None when `what` kernels can run on `device`, else why not. `missing`: the torch features they need that
    this torch lacks."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return f"{what} kernels run on CUDA only, not {dev.type}"
    cc = torch.cuda.get_device_capability(dev)
    if tuple(cc) < min_capability:
        return f"{what} needs SM{min_capability[0]}{min_capability[1]}+ ({generation}), this GPU is SM{cc[0]}{cc[1]}"
    if missing:
        return f"torch {torch.__version__} lacks {' and '.join(missing)}"
    return None
