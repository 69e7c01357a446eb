"""The training corpus: Python's own standard library sources, split train/held-out by path hash."""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

HELD_OUT_PERCENT = 10


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file()]
    return sorted(files)


def is_held_out(path: Path) -> bool:
    """Deterministic by the path relative to the stdlib root, so every install splits alike."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def read_texts(held_out: bool, max_bytes: int = 200_000) -> list[str]:
    out = []
    for p in stdlib_files():
        if is_held_out(p) != held_out:
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if 0 < len(text) <= max_bytes:
            out.append(text)
    return out
