"""Where the quantized kernels run, by CUDA compute capability. Torch-free: the serving front reads it too.

`torch._scaled_grouped_mm` (F.scaled_grouped_mm), which FP8 experts run on, has kernels for SM90 (Hopper) and
SM100 (datacenter Blackwell) only (read in torch 2.13's sources; UNVERIFIED on a GPU: none here). Ada (SM89) and
consumer Blackwell (SM12x) have FP8 tensor cores but no such kernel, so they serve bf16.
"""

from __future__ import annotations

FP8_MAJORS = (9, 10)  # SM9x, SM10x
FP8_INSTEAD = "torch-bf16-any"


def fp8_refusal(capability: tuple[int, int]) -> str | None:
    """None where FP8 profiles run; else why not and what the card gets instead."""
    if capability[0] in FP8_MAJORS:
        return None
    sm = f"SM{capability[0]}{capability[1]}"
    return (f"FP8 runs on SM90 and SM100 only (torch._scaled_grouped_mm has no kernel for {sm}); this GPU is {sm}: "
            f"serve bf16 instead ({FP8_INSTEAD}: the unquantized checkpoint, or a `dgemma build --profile "
            f"{FP8_INSTEAD}`)")
