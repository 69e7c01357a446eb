"""Build directories for serving tests, made with service.model.build_manifest alone (fast; no `dgemma build`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from service.model.build_manifest import VERIFY, tree_sha256, write_manifest
from service.serve.profiles import find_profile


def copy_as_build(src: Path, dst: Path, profile: str = "torch-fp32-cpu") -> Path:
    """`src`'s files as a complete build of `profile` (its weights are not converted: for manifest checks)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.md", "training_meta.json"))
    verification = {"note": "made by tests/builds.py, not verified"}
    (dst / VERIFY).write_text(json.dumps(verification))
    write_manifest(dst, {"profile": find_profile(profile).manifest_entry(),
                         "architecture": json.loads((src / "config.json").read_text())["architectures"][0],
                         "source": {"sha256": tree_sha256(src)}, "tools": {"torch": torch.__version__},
                         "calibration": None, "verification": verification, "created": "2026-12-01T00:00:00Z"})
    return dst
