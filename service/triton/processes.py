"""The processes of one Triton run, found through /proc (Linux), so that none outlives a stop or a restart.

A run's processes are those whose environment holds its marker (NAME=value, inherited from tritonserver
by the backend stubs it launches, whatever session or parent they end up with). A stub orphaned by a
dead tritonserver ignores SIGTERM, so it is killed with SIGKILL. A zombie's environment cannot be read:
the run's zombies are found by session (tritonserver starts one of its own), only to be reaped.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from collections.abc import Collection
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make orphans of our descendants (a dead Triton's stubs) our children rather than init's, so that we
    can reap them. True when the kernel agreed (Linux only)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, session) of `pid`; None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[2]), int(fields[3])


def _has_env(pid: int, marker: bytes) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # gone, or not ours to read
        return False


def run_processes(marker: str | None, session: int | None = None) -> dict[int, str]:
    """pid -> state ('R', 'S', 'T', 'Z', ...) of each process, zombies included, whose environment holds
    `marker` or whose process group or session is `session`; this process excluded."""
    found: dict[int, str] = {}
    try:
        entries = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    except OSError:  # no /proc: nothing to find
        return found
    me, raw = os.getpid(), marker.encode() if marker else None
    for pid in entries:
        st = _stat(pid)
        if st is None or pid == me:
            continue
        if (session is not None and session in st[1:]) or (raw is not None and _has_env(pid, raw)):
            found[pid] = st[0]
    return found


def alive(states: dict[int, str]) -> list[int]:
    """The pids that still run (a zombie holds no memory: it counts as gone)."""
    return sorted(pid for pid, state in states.items() if state not in ("Z", "X"))


def kill_run(marker: str, session: int | None = None, exclude: Collection[int] = (),
             timeout: float = 10.0) -> list[int]:
    """SIGKILL every live process carrying `marker`, reap the run's zombies that are our children, and wait
    up to `timeout` until none is alive (a GPU process can take a moment to release its memory). The
    session only finds zombies: a reused pid in it is never killed. Returns the pids killed."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        live = [pid for pid in alive(run_processes(marker)) if pid not in exclude]
        for pid in live:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        for pid, state in run_processes(marker, session).items():
            if state == "Z" and pid not in exclude:  # ours once we are their subreaper (or their parent)
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
        if not live or time.monotonic() > deadline:
            return sorted(killed)
        time.sleep(0.05)
