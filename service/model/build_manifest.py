"""Build directories: `manifest.json` (written last by `dgemma build`) and its check at serve time.

A build is a Hugging Face checkpoint directory plus `verify.json` and `manifest.json`. The manifest lists the
sha256 of every other file; `read_build` refuses a build whose files are missing, changed or unlisted, naming
the file. The digest of a directory is sha256 over the sorted lines "<relpath>\\0<file sha256>\\n".
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from service.errors import CheckpointError
from service.model.config import read_json_object

BUILD_FORMAT = "dgemma-build/1"
MANIFEST = "manifest.json"
VERIFY = "verify.json"
_REQUIRED = ("format", "profile", "architecture", "source", "files", "tools", "calibration", "verification",
             "created")
_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _regular_files(root: Path) -> list[str]:
    """Relative POSIX paths of the regular files under `root`, sorted; symlinks are not followed."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                out.append(p.relative_to(root).as_posix())
    return sorted(out)


def file_digests(root: str | Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """{relpath: sha256} of the regular files under `root`, minus `exclude`."""
    root = Path(root)
    return {rel: sha256_file(root / rel) for rel in _regular_files(root) if rel not in exclude}


def tree_sha256(root: str | Path) -> str:
    """Digest of a directory's regular files (names and contents)."""
    h = hashlib.sha256()
    for rel, digest in sorted(file_digests(root).items()):
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()


def is_build(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def write_manifest(root: str | Path, manifest: dict) -> dict:
    """Fill `files` with the digest of every file in `root` (except the manifest), check the required keys and
    write manifest.json last. Returns the manifest written."""
    root = Path(root)
    m = dict(manifest)
    m.setdefault("format", BUILD_FORMAT)
    m["files"] = file_digests(root, exclude=(MANIFEST,))
    missing = [k for k in _REQUIRED if k not in m]
    if missing:
        raise ValueError(f"manifest lacks {missing}")
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, root / MANIFEST)
    return m


def read_build(root: str | Path) -> dict:
    """The manifest of the build at `root`, after checking every file: CheckpointError naming the first file that
    is missing, changed or not listed, or the manifest itself when it is malformed."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{MANIFEST} missing in {root.name}: not a complete build")
    m = read_json_object(path)
    if m.get("format") != BUILD_FORMAT:
        raise CheckpointError(f"{MANIFEST}: format is not {BUILD_FORMAT!r}")
    missing = [k for k in _REQUIRED if k not in m]
    files = m.get("files")
    if missing or not isinstance(files, dict) or not files or not isinstance(m.get("profile"), dict):
        raise CheckpointError(f"{MANIFEST} is incomplete (missing or empty: {missing or ['files/profile']})")
    for rel in sorted(files):
        p = root / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(f"{MANIFEST} lists a path outside the build: {rel}")
        if not p.is_file():
            raise CheckpointError(f"build file {rel} is missing")
        if sha256_file(p) != files[rel]:
            raise CheckpointError(f"build file {rel} does not match its sha256 in {MANIFEST} (changed or corrupt)")
    unlisted = [rel for rel in _regular_files(root) if rel != MANIFEST and rel not in files]
    if unlisted:
        raise CheckpointError(f"build file {unlisted[0]} is not listed in {MANIFEST}")
    return m
