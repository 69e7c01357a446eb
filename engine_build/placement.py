"""Where and in which dtype calibration and verification run (docs/build.md, "Device and dtype").

- a GPU (`--device auto` when `torch.cuda.is_available()`, or `--device cuda`): bfloat16. UNVERIFIED: no GPU has
  run this project's build stage.
- the CPU: float32 for a source of at most FLOAT32_MAX_PARAMS parameters (4 GB of weights), bfloat16 above, so
  a large model is held in one bfloat16 copy (25.2B parameters: 50 GB instead of 101 GB).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from service.errors import InvalidArgument

DEVICES = ("auto", "cpu", "cuda")
FLOAT32_MAX_PARAMS = 1_000_000_000


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu" or "cuda"
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def parameter_count(ckpt: Path) -> int:
    """Elements of every tensor in the checkpoint's safetensors files, read from their headers only."""
    from service.model.loading import shard_header

    total = 0
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        header, _ = shard_header(f)
        for entry in header.values():
            n = 1
            for d in entry["shape"]:
                n *= d
            total += n
    return total


def choose(device: str, source: Path, field: str = "--device") -> Placement:
    """The placement for `source` on `device` ("auto", "cpu" or "cuda"); InvalidArgument naming `field` for an
    unknown device or for "cuda" on a machine without one."""
    if device not in DEVICES:
        raise InvalidArgument(field, f"{device!r} is not one of {', '.join(DEVICES)}")
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise InvalidArgument(field, f"cuda was asked for, but torch {torch.__version__} sees no CUDA device "
                                     "(torch.cuda.is_available() is false); use --device cpu or auto")
    if device == "cuda" or (device == "auto" and cuda):
        return Placement("cuda", torch.bfloat16)  # UNVERIFIED: no GPU has run the build stage
    small = parameter_count(source) <= FLOAT32_MAX_PARAMS
    return Placement("cpu", torch.float32 if small else torch.bfloat16)


def free_memory(device: str) -> None:
    """Collect what was just dropped (an engine and its scheduler reference each other) and, on a GPU, hand the
    cached blocks back so that the next model finds them free."""
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()  # UNVERIFIED on a GPU
