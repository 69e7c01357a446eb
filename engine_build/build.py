"""`dgemma build`: source checkpoint -> verified build directory (docs/build.md).

The build is written into a sibling `<out>.partial-<random>` directory and renamed to `<out>` only once it has
passed verification and its manifest is written; on any failure the partial directory is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from engine_build.calibration import CalibrationSettings, PromptSet, builtin_prompts, heldout_prompts, read_prompt_file
from engine_build.placement import Placement, choose, free_memory
from engine_build.verify import VerifySettings, verify
from service import __version__
from service.errors import DGemmaError, InvalidArgument
from service.model.build_manifest import MANIFEST, VERIFY, is_build, read_build, tree_sha256, write_manifest
from service.serve.profiles import Profile, can_build, find_profile, probe_machine

TRTLLM_OPTIONS = "trtllm_llm_api_options.yaml"


class BuildFailed(DGemmaError):
    """The build did not pass verification (nothing is left at the output path)."""


@dataclass
class BuildOptions:
    source: Path
    profile: str
    output: Path
    calibration: Path | None = None  # None: the built-in prompt set
    fp8_scaling: str = "per-tensor"
    min_agreement: float | None = None  # None: the precision's default (verify.THRESHOLDS)
    calibration_settings: CalibrationSettings = field(default_factory=CalibrationSettings)
    verify_prompts: int | None = None  # first N held-out prompts; None: all
    verify_steps: int = 8
    threads: int | None = None  # torch threads for calibration and verification (None: torch's default)
    if_missing: bool = False  # output already holds this build (same profile and source): check it, build nothing
    device: str = "auto"  # calibration and verification: "auto" (a GPU when there is one), "cpu" or "cuda"


def _tools() -> dict:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {"torch": torch.__version__, "modelopt": version("nvidia-modelopt"),
            "transformers": version("transformers"), "dgemma": __version__}


def _check_output(out: Path, profile: Profile, source_sha: str, if_missing: bool) -> bool:
    """Whether `out` already holds this very build (with `if_missing`); raises for anything else it holds."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise InvalidArgument("--output", f"{out} exists and is not a directory")
    if is_build(out):
        try:
            m = json.loads((out / MANIFEST).read_text())
            held, held_source = m["profile"]["name"], m["source"]["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            raise InvalidArgument("--output", f"{out} holds a build with an unreadable {MANIFEST}; remove it") from None
        if held != profile.name or held_source != source_sha:
            raise InvalidArgument("--output", f"{out} already holds another build ({held} of source "
                                              f"{held_source[:12]}); choose another directory or remove it")
        if if_missing:
            return True
        raise InvalidArgument("--output", f"{out} already holds this build ({held}); re-check it with "
                                          f"`dgemma build --verify {out}` or remove it to rebuild")
    if any(out.iterdir()):
        raise InvalidArgument("--output", f"{out} is not empty and holds no build; choose an empty or new directory")
    return False


def _verify_settings(opts: BuildOptions) -> VerifySettings:
    prompts = heldout_prompts()
    if opts.verify_prompts is not None:
        if opts.verify_prompts < 1:
            raise InvalidArgument("--verify-prompts", "must be at least 1")
        prompts = prompts[: opts.verify_prompts]
    return VerifySettings(prompts=prompts, max_denoising_steps=opts.verify_steps, threads=opts.threads,
                          device=opts.device)


def _trtllm_options(profile: Profile) -> str:
    kv = "fp8" if profile.precision == "nvfp4" else "auto"  # the NVFP4 recipe calibrates an FP8 KV cache
    return (f"# TensorRT-LLM LLM API options for this {profile.name} build: pass to `trtllm-serve <build dir>\n"
            f"# --extra_llm_api_options {TRTLLM_OPTIONS}` or as keywords of LLM(model=<build dir>).\n"
            "# UNVERIFIED: tensorrt_llm cannot be installed on the machines this project has, and DiffusionGemma\n"
            "# must be registered with TensorRT-LLM out of tree (its executor decodes autoregressively).\n"
            "backend: pytorch\n"
            "kv_cache_config:\n"
            f"  dtype: {kv}\n"
            "  enable_block_reuse: false\n")


def _calibration(opts: BuildOptions) -> PromptSet:
    return builtin_prompts() if opts.calibration is None else read_prompt_file(opts.calibration)


def _make(opts: BuildOptions, profile: Profile, prompts: PromptSet | None, tmp: Path, place: Placement) -> None:
    """Write the model files of the build into `tmp`; calibration runs on `place` (a GPU: UNVERIFIED)."""
    from engine_build import quantize

    if not profile.quantized:
        quantize.cast_checkpoint(opts.source, tmp, torch.float32 if profile.precision == "fp32" else torch.bfloat16)
        return
    from engine_build.calibration import forward_loop
    from engine_build.reference import generation_ids, load_reference
    from service.model.config import read_config
    from service.text.tokenizer import load_tokenizer

    eos, pad, bos = generation_ids(opts.source)
    tok = load_tokenizer(opts.source, bos)
    if tok is None:
        raise InvalidArgument("--checkpoint", "the source has no tokenizer.json; calibration prompts need one")
    canvas = read_config(opts.source).canvas_length
    loop = forward_loop([tok.encode(p) for p in prompts.prompts], opts.calibration_settings, canvas, eos, pad,
                        place.device)
    with contextlib.redirect_stdout(sys.stderr):  # ModelOpt prints progress; stdout is the build's JSON line
        model = load_reference(opts.source, place.dtype, place.device)
        quantize.quantize(model, profile.precision, loop, opts.fp8_scaling)
        quantize.export(model, opts.source, tmp)
    if profile.backend == "trtllm":
        (tmp / TRTLLM_OPTIONS).write_text(_trtllm_options(profile))


def build(opts: BuildOptions) -> dict:
    """Build, verify and write the manifest; returns the manifest. Raises DGemmaError (nothing left behind).
    With `if_missing`, an output that already holds this build (profile and source sha256 equal) is checked
    file by file and its manifest returned: a Job that runs again does no work."""
    from engine_build.reference import check_source

    profile = find_profile(opts.profile, "--profile")
    check_source(opts.source)
    if opts.fp8_scaling not in ("per-tensor", "per-channel"):
        raise InvalidArgument("--fp8-scaling", f"{opts.fp8_scaling!r} is not per-tensor or per-channel")
    if opts.calibration_settings.steps < 2:
        raise InvalidArgument("--calibration-steps", "must be at least 2 (self-conditioning runs from step 2)")
    if opts.threads is not None:
        if opts.threads < 1:
            raise InvalidArgument("--threads", "must be at least 1")
        torch.set_num_threads(opts.threads)
    ok, why = can_build(profile, probe_machine())
    if not ok:
        raise InvalidArgument("--profile", f"cannot build {profile.name} here: {why}")
    place = choose(opts.device, opts.source)
    prompts = _calibration(opts) if profile.quantized else None
    settings = _verify_settings(opts)
    source_sha = tree_sha256(opts.source)
    out = opts.output
    if _check_output(out, profile, source_sha, opts.if_missing):
        return read_build(out)  # every file checked against the manifest (CheckpointError naming one that is not)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.partial-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        _make(opts, profile, prompts, tmp, place)
        free_memory(place.device)  # the calibrated model, before verification loads the source
        result = verify(tmp, opts.source, profile.precision, settings, opts.min_agreement)
        if profile.backend == "trtllm":
            result["runtime"] += "; serving it on TensorRT-LLM is unverified"
        (tmp / VERIFY).write_text(json.dumps(result, indent=2) + "\n")
        if result["status"] == "failed":
            raise BuildFailed(f"verification failed: token agreement {result['token_agreement']:.4f} is below "
                              f"{result['threshold']} (mean KL {result['mean_kl']:.4g}); no build written to {out}")
        manifest = write_manifest(tmp, {
            "profile": profile.manifest_entry(), "architecture": json.loads((tmp / "config.json").read_text())
            ["architectures"][0], "source": {"sha256": source_sha}, "tools": _tools(),
            "calibration": prompts.record() if prompts else None, "verification": result,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def reverify(build_dir: Path, source: Path, min_agreement: float | None = None, verify_prompts: int | None = None,
             verify_steps: int = 8, threads: int | None = None, device: str = "auto") -> dict:
    """Check an existing build's files and source, verify it again, and record the result (verify.json and the
    manifest, rewritten last). Raises BuildFailed when it no longer passes."""
    from engine_build.reference import check_source

    manifest = read_build(build_dir)  # CheckpointError naming a missing, changed or unlisted file
    check_source(source)
    if tree_sha256(source) != manifest["source"]["sha256"]:
        raise InvalidArgument("--checkpoint", f"{source} is not the source this build was made from "
                                              "(its sha256 differs from the manifest's)")
    profile = find_profile(manifest["profile"]["name"], "manifest.json profile")
    opts = BuildOptions(source, profile.name, build_dir, verify_prompts=verify_prompts, verify_steps=verify_steps,
                        threads=threads, device=device)
    result = verify(build_dir, source, profile.precision, _verify_settings(opts), min_agreement)
    (build_dir / VERIFY).write_text(json.dumps(result, indent=2) + "\n")
    write_manifest(build_dir, {**manifest, "verification": result})
    if result["status"] == "failed":
        raise BuildFailed(f"verification failed: token agreement {result['token_agreement']:.4f} is below "
                          f"{result['threshold']} (mean KL {result['mean_kl']:.4g})")
    return result
