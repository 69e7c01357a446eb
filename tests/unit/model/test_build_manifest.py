"""Build manifests: digests, write_manifest and read_build's refusals, each naming the file."""

import hashlib
import json

import pytest

from service.errors import CheckpointError
from service.model.build_manifest import (
    MANIFEST,
    is_build,
    read_build,
    sha256_file,
    tree_sha256,
    write_manifest,
)
from service.serve.profiles import find_profile


def _manifest() -> dict:
    return {"profile": find_profile("torch-fp32-cpu").manifest_entry(),
            "architecture": "DiffusionGemmaForBlockDiffusion",
            "source": {"sha256": "0" * 64}, "tools": {"torch": "x", "modelopt": None, "transformers": None,
                                                     "dgemma": "0"},
            "calibration": None, "verification": {"passed": True}, "created": "2026-12-01T00:00:00Z"}


@pytest.fixture
def build(tmp_path):
    d = tmp_path / "build"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(bytes(range(256)))
    (d / "sub" / "tokenizer.json").write_text("tok")
    write_manifest(d, _manifest())
    return d


def test_digests(tmp_path):
    (tmp_path / "a").write_bytes(b"abc")
    assert sha256_file(tmp_path / "a") == hashlib.sha256(b"abc").hexdigest()
    lines = f"a\0{hashlib.sha256(b'abc').hexdigest()}\n"
    assert tree_sha256(tmp_path) == hashlib.sha256(lines.encode()).hexdigest()
    (tmp_path / "b").write_bytes(b"")
    before = tree_sha256(tmp_path)
    (tmp_path / "b").rename(tmp_path / "c")  # a renamed file changes the digest too
    assert tree_sha256(tmp_path) != before


def test_write_then_read(build):
    m = read_build(build)
    assert is_build(build) and m["format"] == "dgemma-build/1"
    assert sorted(m["files"]) == ["config.json", "model.safetensors", "sub/tokenizer.json"]
    assert m["files"]["config.json"] == sha256_file(build / "config.json")
    assert m["profile"]["name"] == "torch-fp32-cpu"


def test_write_refuses_incomplete_manifest(tmp_path):
    with pytest.raises(ValueError, match="verification"):
        write_manifest(tmp_path, {k: v for k, v in _manifest().items() if k != "verification"})
    assert not is_build(tmp_path)


def test_one_changed_byte_is_named(build):
    p = build / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[100] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors does not match"):
        read_build(build)


@pytest.mark.parametrize("damage, named", [
    (lambda d: (d / "sub" / "tokenizer.json").unlink(), "sub/tokenizer.json is missing"),
    (lambda d: (d / "extra.bin").write_bytes(b"x"), "extra.bin is not listed"),
    (lambda d: (d / MANIFEST).unlink(), "manifest.json missing"),
    (lambda d: (d / MANIFEST).write_text("{"), "manifest.json is malformed"),
    (lambda d: (d / MANIFEST).write_text(json.dumps({"format": "dgemma-build/1"})), "manifest.json is incomplete"),
    (lambda d: (d / MANIFEST).write_text(json.dumps({**_manifest(), "format": "dgemma-build/1",
                                                     "files": {"../x": "0"}})), "outside the build"),
])
def test_damaged_builds_are_refused(build, damage, named):
    damage(build)
    with pytest.raises(CheckpointError, match=named):
        read_build(build)
