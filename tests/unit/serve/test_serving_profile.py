"""`dgemma serve` picks its profile: from a build's checked manifest, NIM_MODEL_PROFILE, or the machine."""

import pytest

from service import DEFAULT_CHECKPOINT
from service.errors import CheckpointError, InvalidArgument, Unavailable
from service.serve.config import resolve_serving
from service.serve.profiles import Machine, find_profile
from tests.builds import copy_as_build

CPU = Machine(False, None, None, False, False)
H100 = Machine(True, (9, 0), "H100", False, True)
A100 = Machine(True, (8, 0), "A100", False, True)


def fake_build(tmp_path, profile: str):
    return copy_as_build(DEFAULT_CHECKPOINT, tmp_path / "build", profile)  # the loader is not run here


def test_raw_checkpoint_auto_selects_by_machine():
    assert resolve_serving(DEFAULT_CHECKPOINT, None, "F", CPU).label == "torch-fp32-cpu"
    s = resolve_serving(DEFAULT_CHECKPOINT, None, "F", A100)
    assert (s.profile.name, s.device, s.dtype, s.manifest) == ("torch-bf16-any", "cuda", "bfloat16", None)
    with pytest.raises(InvalidArgument, match="dgemma build --profile torch-fp8-hopper") as e:
        resolve_serving(DEFAULT_CHECKPOINT, "torch-fp8-hopper", "--profile", H100)
    assert e.value.field == "--profile"


def test_build_fixes_the_profile(tmp_path):
    d = fake_build(tmp_path, "torch-fp8-hopper")
    s = resolve_serving(d, None, "NIM_MODEL_PROFILE", CPU)
    assert (s.device, s.dtype, s.label) == ("cpu", "float32", "torch-fp8-hopper (dequantized on cpu)")
    assert s.manifest["profile"]["name"] == "torch-fp8-hopper"
    native = resolve_serving(d, find_profile("torch-fp8-hopper").id, "NIM_MODEL_PROFILE", H100)  # by id
    assert (native.device, native.dtype, native.label) == ("cuda", "bfloat16", "torch-fp8-hopper")
    fp4_build = fake_build(tmp_path / "b", "torch-nvfp4-blackwell")
    nvfp4 = resolve_serving(fp4_build, None, "F", Machine(True, (10, 0), "B200", False, True))
    assert (nvfp4.device, nvfp4.dtype, nvfp4.label) == ("cuda", "bfloat16", "torch-nvfp4-blackwell")  # FP4 experts
    on_hopper = resolve_serving(fp4_build, None, "F", H100)  # an NVFP4 build off Blackwell: dequantized
    assert on_hopper.label == "torch-nvfp4-blackwell (dequantized on cuda)"
    with pytest.raises(InvalidArgument, match="torch-fp32-cpu asked for, but build is a torch-fp8-hopper build"):
        resolve_serving(d, "torch-fp32-cpu", "NIM_MODEL_PROFILE", CPU)


def test_tampered_build_refused_naming_the_file(tmp_path):
    d = fake_build(tmp_path, "torch-fp32-cpu")
    (d / "config.json").write_text((d / "config.json").read_text() + " ")
    with pytest.raises(CheckpointError, match="config.json does not match"):
        resolve_serving(d, None, "NIM_MODEL_PROFILE", CPU)


def test_trtllm_build_fails_clearly_without_tensorrt_llm(tmp_path):
    d = fake_build(tmp_path, "trtllm-fp8-hopper")
    with pytest.raises(Unavailable, match="tensorrt_llm"):
        resolve_serving(d, None, "NIM_MODEL_PROFILE", H100)


@pytest.mark.parametrize("cc", [(8, 9), (12, 0)])
def test_fp8_build_refused_on_gpus_without_its_kernels(tmp_path, cc):
    d = fake_build(tmp_path, "torch-fp8-hopper")
    with pytest.raises(Unavailable, match=r"torch-fp8-hopper: FP8 runs on SM90 and SM100 only.*serve bf16 instead "
                                          r"\(torch-bf16-any"):
        resolve_serving(d, None, "NIM_MODEL_PROFILE", Machine(True, cc, "GPU", False, True))
    assert resolve_serving(d, None, "F", CPU).label == "torch-fp8-hopper (dequantized on cpu)"  # a CPU still can
