"""The ports `dgemma serve` listens on for a given environment, read from its own configuration code
(service/serve/config.py), so that the chart and the Dockerfile are checked against the server, not a list."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields

from service.serve.config import serve_options


def listening_ports(env: Mapping[str, str]) -> dict[str, int]:
    """Every listen port of the options `dgemma serve` would run with: each `*port` field of the front's
    settings and of the supervisor's options (Triton's ports, on 127.0.0.1 inside the pod, are `triton_ports`)."""
    opts = serve_options(env)
    found = {f"front.{f.name}": getattr(opts.front, f.name) for f in fields(opts.front) if f.name.endswith("port")}
    found |= {f.name: getattr(opts, f.name) for f in fields(opts) if f.name.endswith("port")}
    ports = {name: port for name, port in found.items() if port is not None}  # None: that face is not served
    # gRPC, HTTP and metrics at least: fewer means the walk above no longer sees them
    assert len(ports) >= 3 and all(isinstance(p, int) and p > 0 for p in ports.values()), ports
    return ports
