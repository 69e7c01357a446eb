"""The GPU benchmark's code path runs (on the CPU, toy shape): it cannot measure anything here."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_real_shape.py"


def test_gpu_benchmark_smoke_runs_on_cpu():
    out = subprocess.run([sys.executable, str(SCRIPT), "--smoke-cpu", "--batches", "1,2", "--steps", "4",
                          "--prefix-requests", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["canvases"] for r in result["results"]] == [1, 2]
    assert "not a measurement" in result["device"]
    shared = result["shared_prefix"]
    assert shared["own_prefix_hit_rate"] == 0.0 and shared["shared_prefix_hit_rate"] > 0.4  # the second reuses


def test_gpu_benchmark_without_cuda_says_so():
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "no CUDA device" in out.stdout


def test_the_gpu_session_fits_one_device_call_with_margin():
    """tools/gpu_session.sh's timeouts (its defaults) add up to well under the device tool's 600 s a call."""
    import re

    text = (SCRIPT.parents[1] / "tools" / "gpu_session.sh").read_text()
    limits = [int(s) for s in re.findall(r'timeout "\$\{\w+:-(\d+)\}"', text)]
    assert len(limits) == 2 and sum(limits) <= 540, limits
    assert not re.search(r"timeout \d", text)  # every timeout is one of the counted knobs


def test_the_random_model_is_made_in_bf16_on_its_device():
    """No float32 weight is ever allocated on the device (94 GiB at the real shape: out of memory on an H100)."""
    sys.path.insert(0, str(SCRIPT.parents[1]))
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from benchmarks.gpu_real_shape import random_model, toy_config

    class Allocations(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.float32 = 0  # elements allocated in float32 on a real device

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.device.type != "meta" and out.dtype == torch.float32 \
                    and func.overloadpacket in (torch.ops.aten.empty_strided, torch.ops.aten.empty_like,
                                                torch.ops.aten.empty):
                self.float32 += out.numel()
            return out

    with Allocations() as seen:
        model = random_model(toy_config(), torch.device("cpu"))
    weights = sum(p.numel() for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert seen.float32 < weights // 10, (seen.float32, weights)  # buffers (rope tables) only
