"""The repository's Dockerfile, parsed by Docker's own parser (the `dockerfile` package), as stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import dockerfile

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


@dataclass
class Stage:
    image: str
    name: str | None
    commands: list[dockerfile.Command] = field(default_factory=list)

    def all(self, cmd: str) -> list[dockerfile.Command]:
        return [c for c in self.commands if c.cmd == cmd]

    def env(self) -> dict[str, str]:
        """ENV key=value pairs in order (later wins), values as written (no $VAR expansion)."""
        out: dict[str, str] = {}
        for c in self.all("ENV"):
            pairs = c.value
            for i in range(0, len(pairs), 2):
                out[pairs[i]] = pairs[i + 1]
        return out

    def labels(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for c in self.all("LABEL"):
            for i in range(0, len(c.value), 2):
                out[c.value[i]] = c.value[i + 1].strip('"')
        return out

    def exec_form(self, cmd: str) -> list[str]:
        """ENTRYPOINT / CMD / HEALTHCHECK CMD as an argv (exec form required)."""
        (c,) = self.all(cmd)
        assert c.json, f"{cmd} must use the exec (JSON) form: {c.original}"
        values = list(c.value)
        return values[1:] if cmd == "HEALTHCHECK" and values[0] == "CMD" else values


def stages(path: Path = DOCKERFILE) -> list[Stage]:
    out: list[Stage] = []
    for c in dockerfile.parse_file(str(path)):
        if c.cmd == "FROM":
            v = list(c.value)
            out.append(Stage(v[0], v[2] if len(v) == 3 and v[1].upper() == "AS" else None))
        elif out:
            out[-1].commands.append(c)
    return out


INIT = ["tini", "--"]  # the image's PID 1 (installed from Ubuntu's packages), before the program it runs


def image_argv(final: Stage) -> list[str]:
    return final.exec_form("ENTRYPOINT") + final.exec_form("CMD")


def program_argv(final: Stage) -> list[str]:
    """The command line tini runs: the image's argv without the init."""
    argv = image_argv(final)
    assert argv[:len(INIT)] == INIT, f"the image's PID 1 must be {INIT}: {argv}"
    return argv[len(INIT):]
