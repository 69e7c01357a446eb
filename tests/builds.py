"""Build directories for serving tests, made with service.model.build_manifest (not `dgemma build`).

`float_build` copies a checkpoint as a torch-fp32-cpu build; `modelopt_fp8_build` quantizes the checkpoint with
ModelOpt itself (mtq.quantize with FP8_DEFAULT_CFG, a short calibration, export_hf_checkpoint), as the e2e test
of an FP8 build needs one while `dgemma build` lives on another branch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from service.model.build_manifest import VERIFY, tree_sha256, write_manifest
from service.serve.profiles import find_profile

_COPIED = ("tokenizer.json", "generation_config.json")


def _manifest(src: Path, profile: str, tools: dict) -> dict:
    return {"profile": find_profile(profile).manifest_entry(),
            "architecture": json.loads((src / "config.json").read_text())["architectures"][0],
            "source": {"sha256": tree_sha256(src)}, "tools": {"torch": torch.__version__, **tools},
            "calibration": None, "verification": {"note": "made by tests/builds.py, not verified"},
            "created": "2026-12-01T00:00:00Z"}


def finish(src: Path, dst: Path, profile: str, tools: dict | None = None) -> Path:
    manifest = _manifest(src, profile, tools or {})
    (dst / VERIFY).write_text(json.dumps(manifest["verification"]))
    write_manifest(dst, manifest)
    return dst


def float_build(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.md", "training_meta.json"))
    return finish(src, dst, "torch-fp32-cpu")


def modelopt_fp8_build(src: Path, dst: Path, calib_prompts: list[list[int]]) -> Path:
    import modelopt
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import DiffusionGemmaForBlockDiffusion

    work = dst.parent / (dst.name + ".src")
    shutil.copytree(src, work, ignore=shutil.ignore_patterns("generation_config.json"))  # its sampler_config
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(work, dtype=torch.float32).eval()

    def calibrate(m):
        with torch.no_grad():
            for ids in calib_prompts:
                m(input_ids=torch.tensor([ids]))

    # As ModelOpt's DiffusionGemma recipe: a text-only calibration never runs the self-conditioning projection.
    cfg = {**mtq.FP8_DEFAULT_CFG, "quant_cfg": [*mtq.FP8_DEFAULT_CFG["quant_cfg"],
                                                {"quantizer_name": "*self_conditioning*", "enable": False}]}
    model = mtq.quantize(model, cfg, forward_loop=calibrate)
    export_hf_checkpoint(model, export_dir=str(dst))
    shutil.rmtree(work)
    for name in _COPIED:
        shutil.copy2(src / name, dst / name)
    return finish(src, dst, "torch-fp8-hopper", {"modelopt": modelopt.__version__})
