"""Profiles: names, content-hash ids, what a machine can build and run, and the automatic choice."""

import dataclasses

import pytest

from service.errors import InvalidArgument
from service.serve.profiles import PROFILES, Machine, can_build, can_run, find_profile, select_profile

CPU = Machine(cuda=False, compute_capability=None, device_name=None, tensorrt_llm=False, modelopt=True)
CPU_BARE = dataclasses.replace(CPU, modelopt=False)
A100 = Machine(True, (8, 0), "A100", False, True)
H100 = Machine(True, (9, 0), "H100", False, True)
B200 = Machine(True, (10, 0), "B200", True, True)
L40S = Machine(True, (8, 9), "L40S", False, True)
RTX5090 = Machine(True, (12, 0), "RTX 5090", False, True)


def test_six_profiles_named_backend_precision_target():
    assert [p.name for p in PROFILES] == ["torch-fp32-cpu", "torch-bf16-any", "torch-fp8-hopper",
                                          "torch-nvfp4-blackwell", "trtllm-fp8-hopper", "trtllm-nvfp4-blackwell"]
    for p in PROFILES:
        assert p.name == f"{p.backend}-{p.precision}-{p.target}"
        assert p.activation_dtype == ("float32" if p.precision == "fp32" else "bfloat16")
    assert find_profile("torch-fp8-hopper").min_compute_capability == (9, 0)
    assert find_profile("trtllm-nvfp4-blackwell").min_compute_capability == (10, 0)


def test_id_is_a_content_hash():
    ids = [p.id for p in PROFILES]
    assert len(set(ids)) == 6 and all(len(i) == 64 and int(i, 16) >= 0 for i in ids)
    p = PROFILES[2]
    assert dataclasses.replace(p).id == p.id  # same content, same id
    for field, value in [("target", "ada"), ("activation_dtype", "float16"), ("min_compute_capability", (8, 9))]:
        assert dataclasses.replace(p, **{field: value}).id != p.id


def test_find_by_name_id_or_old_name():
    p = find_profile("torch-fp8-hopper")
    assert find_profile(p.id) is p
    assert find_profile("torch-float32-cpu").name == "torch-fp32-cpu"  # the old default still works
    with pytest.raises(InvalidArgument, match="renamed: use torch-bf16-any") as e:
        find_profile("torch-bfloat16-h100", "--profile")
    assert e.value.field == "--profile"
    with pytest.raises(InvalidArgument, match="torch-fp32-cpu, torch-bf16-any") as e:
        find_profile("onnx-int3-cpu")
    assert e.value.field == "NIM_MODEL_PROFILE"


def test_cpu_runs_float_profiles_only():
    runnable = {p.name for p in PROFILES if can_run(p, CPU)[0]}
    assert runnable == {"torch-fp32-cpu", "torch-bf16-any"}
    assert "no CUDA" in can_run(find_profile("torch-fp8-hopper"), CPU)[1]
    assert "tensorrt_llm" in can_run(find_profile("trtllm-fp8-hopper"), H100)[1]
    assert not can_run(find_profile("torch-fp8-hopper"), A100)[0]  # SM80 has no FP8
    assert can_run(find_profile("torch-fp8-hopper"), H100)[0]
    assert not can_run(find_profile("torch-nvfp4-blackwell"), H100)[0]
    assert can_run(find_profile("trtllm-nvfp4-blackwell"), B200)[0]


def test_build_needs_modelopt_for_quantized_profiles_only():
    assert all(can_build(p, CPU)[0] for p in PROFILES)  # FP8 and NVFP4 both export on a CPU
    bare = {p.name for p in PROFILES if can_build(p, CPU_BARE)[0]}
    assert bare == {"torch-fp32-cpu", "torch-bf16-any"}
    assert "modelopt" in can_build(find_profile("trtllm-fp8-hopper"), CPU_BARE)[1]


def test_select_best_runnable():
    every = list(PROFILES)
    assert select_profile(every, CPU).name == "torch-fp32-cpu"
    assert select_profile(every, A100).name == "torch-bf16-any"
    assert select_profile(every, H100).name == "torch-fp8-hopper"
    assert select_profile(every, B200).name == "torch-nvfp4-blackwell"
    fp8_only = [find_profile("torch-fp8-hopper"), find_profile("torch-bf16-any")]
    assert select_profile(fp8_only, B200).name == "torch-fp8-hopper"  # SM100 runs fp8 when there is no nvfp4
    with pytest.raises(InvalidArgument, match="no runnable profile"):
        select_profile([find_profile("torch-fp8-hopper")], CPU)


def test_probe_keeps_the_serving_front_torch_free_on_a_cpu_torch():
    import subprocess
    import sys

    import torch

    if torch.version.cuda is not None:
        pytest.skip("a CUDA build of torch is probed by importing it")
    code = ("import sys; from service.serve.config import serve_options; from service.serve.profiles import "
            "probe_machine; assert not probe_machine().cuda; print(serve_options({}).front.profile, "
            "'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["torch-fp32-cpu", "False"], out.stderr[-2000:]


@pytest.mark.parametrize("card", [L40S, RTX5090], ids=["sm89", "sm120"])
def test_fp8_only_where_scaled_grouped_mm_runs(card):
    """torch._scaled_grouped_mm has SM90 and SM100 kernels only: SM89 and SM12x are offered bf16, not FP8."""
    for name in ("torch-fp8-hopper", "trtllm-fp8-hopper"):
        ok, why = can_run(find_profile(name), dataclasses.replace(card, tensorrt_llm=True))
        assert not ok and "SM90 and SM100 only" in why and "torch-bf16-any" in why, why
    fp8_or_bf16 = [find_profile("torch-fp8-hopper"), find_profile("torch-bf16-any")]
    assert select_profile(fp8_or_bf16, card).name == "torch-bf16-any"
    assert can_run(find_profile("torch-fp8-hopper"), H100)[0] and can_run(find_profile("torch-fp8-hopper"), B200)[0]
