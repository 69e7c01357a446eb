"""`dgemma serve` with a build directory: a tampered or incomplete build never starts, and the error names the file."""

import os
import subprocess
import sys

import pytest

from service import DEFAULT_CHECKPOINT
from tests.builds import copy_as_build


def _serve(tmp_path, build, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1"], capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "NIM_MODEL_PATH": str(build), "NIM_CACHE_PATH": str(tmp_path / "c"),
                               **env})


def _flip_one_byte(path, offset: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, named", [
    (lambda b: _flip_one_byte(b / "model.safetensors"), "build file model.safetensors does not match"),
    (lambda b: _flip_one_byte(b / "tokenizer.json", 10), "build file tokenizer.json does not match"),
    (lambda b: (b / "verify.json").unlink(), "build file verify.json is missing"),
])
def test_tampered_or_incomplete_build_refuses_to_start(tmp_path, damage, named):
    build = copy_as_build(DEFAULT_CHECKPOINT, tmp_path / "build")
    damage(build)
    out = _serve(tmp_path, build)
    assert out.returncode == 2, out.stderr[-2000:]
    assert named in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "c" / "triton.log").exists()  # refused before Triton was started


def test_profile_must_agree_with_the_build(tmp_path):
    build = copy_as_build(DEFAULT_CHECKPOINT, tmp_path / "build")
    out = _serve(tmp_path, build, NIM_MODEL_PROFILE="torch-bf16-any")
    assert out.returncode == 2 and "NIM_MODEL_PROFILE: torch-bf16-any asked for, but build is a torch-fp32-cpu build" \
        in out.stderr, out.stderr[-2000:]
