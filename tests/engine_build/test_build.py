"""`dgemma build` of the embedded tiny model on the CPU: FP8 and NVFP4 (ModelOpt), float copies, bad inputs."""

import ast
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engine_build.build import TRTLLM_OPTIONS, BuildFailed, BuildOptions, build, reverify
from engine_build.calibration import CalibrationSettings, builtin_prompts
from service import DEFAULT_CHECKPOINT
from service.cli import main
from service.errors import CheckpointError, InvalidArgument
from service.model.build_manifest import read_build, tree_sha256

ROOT = Path(__file__).resolve().parents[2]


def _opts(tmp: Path, profile: str, name: str, **kw) -> BuildOptions:
    kw.setdefault("verify_prompts", 4)
    return BuildOptions(DEFAULT_CHECKPOINT, profile, tmp / name, threads=1, **kw)


def _calibration_file(tmp: Path, n: int) -> Path:
    path = tmp / "calib.txt"
    path.write_text("\n".join(builtin_prompts().prompts[:n]) + "\n")
    return path


def _tensors(build_dir: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    out = {}
    for f in build_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                out[k] = (t.dtype, tuple(t.shape))
    return out


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name)


@pytest.fixture(scope="module")
def fp8_build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp8")
    opts = _opts(tmp, "torch-fp8-hopper", "build", calibration=_calibration_file(tmp, 8),
                 calibration_settings=CalibrationSettings(steps=4))
    return build(opts), opts


@pytest.fixture(scope="module")
def fp32_build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp32")
    opts = _opts(tmp, "torch-fp32-cpu", "build", verify_prompts=2)
    return build(opts), opts


def test_fp8_build_is_verified_and_its_manifest_complete(fp8_build):
    manifest, opts = fp8_build
    v = manifest["verification"]
    assert v["status"] == "passed" and v["passed"] is True
    assert v["token_agreement"] >= 0.95 and v["threshold"] == 0.95
    assert 0 < v["mean_kl"] < 0.05  # quantized: not a copy, and close
    assert v["steps_per_canvas"]["build"] > 0 and 0 <= v["sequence_agreement"] <= 1
    assert json.loads((opts.output / "verify.json").read_text()) == v
    assert read_build(opts.output) == manifest  # every file listed, hashes match
    assert manifest["profile"]["name"] == "torch-fp8-hopper" and manifest["profile"]["target"] == "hopper"
    assert manifest["architecture"] == "DiffusionGemmaForBlockDiffusion"
    assert manifest["source"]["sha256"] == tree_sha256(DEFAULT_CHECKPOINT)
    assert manifest["tools"]["modelopt"] == "0.47.0" and manifest["tools"]["torch"] == torch.__version__
    assert manifest["calibration"]["prompts"] == 8 and manifest["calibration"]["source"] == "calib.txt"
    assert {"hf_quant_config.json", "tokenizer.json", "generation_config.json", "verify.json"} <= set(manifest["files"])
    assert _leftovers(opts.output.parent) == []


def test_fp8_quantizes_every_linear_but_router_embeddings_unembedding(fp8_build):
    _, opts = fp8_build
    quant = json.loads((opts.output / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "FP8"
    t = _tensors(opts.output)
    linears = [k for k in t if k.endswith("_proj.weight") and ".router." not in k]
    assert any(".experts." in k for k in linears) and any("self_conditioning" in k for k in linears)
    for k in linears:
        assert t[k][0] == torch.float8_e4m3fn, k
        assert t[k.replace(".weight", ".weight_scale")][1] == (), k  # per-tensor (the default)
        assert k.replace(".weight", ".input_scale") in t, k
    assert t["model.decoder.layers.0.router.proj.weight"][0] == torch.float32
    assert t["model.decoder.embed_tokens.weight"][0] == torch.float32
    assert not any(k.startswith("lm_head") or "vision" in k for k in t)


def test_nvfp4_export_quantizes_the_experts_only(tmp_path):
    """The experts-only recipe, as a trtllm-* build: packed uint8 + fp8 block scales + global scales."""
    assert importlib.util.find_spec("tensorrt_llm") is None  # building a trtllm-* profile does not need it
    opts = _opts(tmp_path, "trtllm-nvfp4-blackwell", "nvfp4", calibration=_calibration_file(tmp_path, 4),
                 calibration_settings=CalibrationSettings(steps=2), verify_prompts=2)
    manifest = build(opts)
    assert manifest["profile"]["target"] == "blackwell" and manifest["profile"]["precision"] == "nvfp4"
    quant = json.loads((opts.output / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "NVFP4" and quant["kv_cache_quant_algo"] == "FP8" and quant["group_size"] == 16
    t = _tensors(opts.output)
    packed = [k for k, (dtype, _) in t.items() if dtype == torch.uint8]
    assert packed and all(".experts." in k for k in packed)
    for k in packed:
        out_f, half_in = t[k][1]
        assert t[k.replace(".weight", ".weight_scale")] == (torch.float8_e4m3fn, (out_f, half_in * 2 // 16)), k
        assert t[k.replace(".weight", ".weight_scale_2")] == (torch.float32, ()), k
    for k in ("model.decoder.layers.0.self_attn.q_proj.weight", "model.decoder.layers.0.mlp.up_proj.weight",
              "model.decoder.self_conditioning.up_proj.weight"):
        assert t[k][0] == torch.float32 and k.replace(".weight", ".weight_scale") not in t, k
    options = (opts.output / TRTLLM_OPTIONS).read_text()
    assert "backend: pytorch" in options and "dtype: fp8" in options and "UNVERIFIED" in options
    assert TRTLLM_OPTIONS in manifest["files"]
    v = manifest["verification"]  # dequantized on the CPU by the serving loader
    assert v["status"] == "passed" and v["token_agreement"] >= v["threshold"] == 0.90
    assert "dequantized" in v["runtime"] and "TensorRT-LLM is unverified" in v["runtime"]
    # the experts' activations in FP4 as well (the NVFP4 runtime's emulation of a Blackwell GPU): reported
    w4a4 = v["w4a4_emulated"]
    assert 0.85 <= w4a4["token_agreement"] < 1.0 and w4a4["mean_kl"] > 0, w4a4
    assert read_build(opts.output) == manifest


def test_float_build_reverifies_and_refuses_a_changed_file(fp32_build, tmp_path):
    manifest, opts = fp32_build
    assert manifest["verification"]["token_agreement"] == 1.0 and manifest["verification"]["mean_kl"] == 0.0
    assert manifest["calibration"] is None and manifest["profile"]["name"] == "torch-fp32-cpu"
    result = reverify(opts.output, DEFAULT_CHECKPOINT, verify_prompts=1, threads=1)
    assert result["passed"] and read_build(opts.output)["verification"] == result
    with pytest.raises(InvalidArgument, match="--checkpoint"):
        reverify(opts.output, opts.output)  # not its source


def test_output_holding_a_build_or_files_is_refused(fp32_build, tmp_path):
    manifest, opts = fp32_build
    for profile, match in (("torch-bf16-any", "another build"), ("torch-fp32-cpu", "already holds this build")):
        with pytest.raises(InvalidArgument, match=match) as e:
            build(BuildOptions(DEFAULT_CHECKPOINT, profile, opts.output))
        assert e.value.field == "--output"
    assert read_build(opts.output)["profile"] == manifest["profile"]  # untouched and still valid
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(InvalidArgument, match="not empty"):
        build(BuildOptions(DEFAULT_CHECKPOINT, "torch-fp32-cpu", other))


def test_if_missing_accepts_this_build_only_and_checks_its_files(fp32_build, tmp_path, capsys):
    """`--if-missing` (a Job that runs again): the same profile and source return the build as it is; another
    profile is still refused; a changed file is named, not rebuilt over."""
    manifest, opts = fp32_build
    before = read_build(opts.output)  # (an earlier test may have re-verified it)
    again = build(BuildOptions(DEFAULT_CHECKPOINT, "torch-fp32-cpu", opts.output, if_missing=True))
    assert again == before and again["created"] == manifest["created"]
    assert main(["build", "--profile", "torch-fp32-cpu", "--output", str(opts.output), "--if-missing"]) == 0
    assert json.loads(capsys.readouterr().out)["created"] == manifest["created"]
    with pytest.raises(InvalidArgument, match="another build"):
        build(BuildOptions(DEFAULT_CHECKPOINT, "torch-bf16-any", opts.output, if_missing=True))
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in opts.output.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    with (copy / "config.json").open("a") as f:
        f.write(" ")
    with pytest.raises(CheckpointError, match="config.json"):
        build(BuildOptions(DEFAULT_CHECKPOINT, "torch-fp32-cpu", copy, if_missing=True))


def test_failed_verification_leaves_nothing(tmp_path):
    with pytest.raises(BuildFailed, match="below 1.01"):
        build(_opts(tmp_path, "torch-fp32-cpu", "out", verify_prompts=1, min_agreement=1.01))
    assert list(tmp_path.iterdir()) == []


def test_tampered_build_is_refused_by_reverify(tmp_path):
    opts = _opts(tmp_path, "torch-fp32-cpu", "out", verify_prompts=1)
    build(opts)
    weights = opts.output / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        reverify(opts.output, DEFAULT_CHECKPOINT)


def test_bad_inputs_are_named_and_leave_nothing(tmp_path):
    with pytest.raises(InvalidArgument, match="unknown profile") as e:
        build(BuildOptions(DEFAULT_CHECKPOINT, "torch-int3-tpu", tmp_path / "a"))
    assert e.value.field == "--profile"
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match="--checkpoint llama: config.json: model_type is 'llama'"):
        build(BuildOptions(other, "torch-fp8-hopper", tmp_path / "b"))
    (tmp_path / "empty.txt").write_text("\n")
    for calib, match in ((tmp_path / "missing.txt", "does not exist"), (tmp_path / "empty.txt", "no prompts")):
        with pytest.raises(InvalidArgument, match=match) as e:
            build(BuildOptions(DEFAULT_CHECKPOINT, "torch-fp8-hopper", tmp_path / "c", calibration=calib))
        assert e.value.field == "--calibration"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "llama"]


def test_cli_reports_a_bad_input_by_its_flag(tmp_path, capsys):
    assert main(["build", "--profile", "torch-int3-tpu", "--output", str(tmp_path / "x")]) == 2
    assert "dgemma: error: --profile: unknown profile 'torch-int3-tpu'" in capsys.readouterr().err
    assert main(["build", "--profile", "torch-fp8-hopper", "--output", str(tmp_path / "x"),
                 "--calibration", str(tmp_path / "none.txt")]) == 2
    assert "--calibration: calibration file" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_service_imports_engine_build_only_in_the_build_command():
    found = []
    for path in (ROOT / "service").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in [None, *[n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]]:
            body = tree.body if fn is None else fn.body
            for node in body:
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                if any(n.split(".")[0] == "engine_build" for n in names):
                    found.append((path.relative_to(ROOT).as_posix(), fn.name if fn else "<module>"))
    assert found and set(found) <= {("service/cli.py", "cmd_build")}


def test_a_large_source_calibrates_and_verifies_in_bf16_on_the_cpu(monkeypatch, tmp_path):
    """Above FLOAT32_MAX_PARAMS the CPU holds one bfloat16 copy: calibration, the export's unquantized tensors and
    verification are bfloat16 (the tiny model, with the limit lowered)."""
    from engine_build import placement

    monkeypatch.setattr(placement, "FLOAT32_MAX_PARAMS", 0)
    opts = _opts(tmp_path, "torch-fp8-hopper", "bf16", calibration=_calibration_file(tmp_path, 2),
                 calibration_settings=CalibrationSettings(steps=2), verify_prompts=1, verify_steps=4)
    v = build(opts)["verification"]
    assert v["runtime"] == "torch cpu bfloat16, fp8 weights dequantized at load"
    assert v["passed"] and 0 < v["mean_kl"] < 0.05, v
    t = _tensors(opts.output)
    assert t["model.decoder.embed_tokens.weight"][0] == torch.bfloat16
    assert t["model.decoder.layers.0.self_attn.q_proj.weight"][0] == torch.float8_e4m3fn
