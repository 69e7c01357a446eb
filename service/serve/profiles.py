"""Serving profiles, NIM style: `<backend>-<precision>-<target>`, each with a content-hash id.

A profile says how a model is built (`dgemma build`) and served (`dgemma serve`). `probe_machine` looks at this
machine without importing heavy optional packages; `can_build`/`can_run` say what it can do with each profile and
why not; `select_profile` picks the best runnable one when NIM_MODEL_PROFILE is unset.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from service.errors import InvalidArgument
from service.model.kernels import fp8_refusal

PROFILE_FORMAT = "dgemma-profile/1"
# Old names (before the build stage) -> new ones; accepted with the new meaning.
ALIASES = {"torch-float32-cpu": "torch-fp32-cpu"}


@dataclass(frozen=True)
class Profile:
    name: str
    backend: str  # "torch" | "trtllm"
    precision: str  # "fp32" | "bf16" | "fp8" | "nvfp4"
    target: str  # "cpu" | "any" | "hopper" | "blackwell"
    activation_dtype: str  # "float32" | "bfloat16"
    min_compute_capability: tuple[int, int] | None

    @property
    def id(self) -> str:
        """sha256 of the canonical JSON of the fields and the format version: stable, derived from content."""
        fields = {"format": PROFILE_FORMAT, "name": self.name, "backend": self.backend,
                  "precision": self.precision, "target": self.target, "activation_dtype": self.activation_dtype,
                  "min_compute_capability": list(self.min_compute_capability or []) or None}
        blob = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def quantized(self) -> bool:
        return self.precision in ("fp8", "nvfp4")

    def manifest_entry(self) -> dict:
        """The profile as build manifests record it."""
        return {"id": self.id, "name": self.name, "backend": self.backend, "precision": self.precision,
                "target": self.target}


def _profile(backend: str, precision: str, target: str) -> Profile:
    cc = {"fp8": (9, 0), "nvfp4": (10, 0)}.get(precision)  # fp8: SM90 and SM100 only (service.model.kernels)
    return Profile(f"{backend}-{precision}-{target}", backend, precision, target,
                   "float32" if precision == "fp32" else "bfloat16", cc)


PROFILES: tuple[Profile, ...] = (
    _profile("torch", "fp32", "cpu"),
    _profile("torch", "bf16", "any"),
    _profile("torch", "fp8", "hopper"),
    _profile("torch", "nvfp4", "blackwell"),
    _profile("trtllm", "fp8", "hopper"),
    _profile("trtllm", "nvfp4", "blackwell"),
)


def find_profile(name_or_id: str, field: str = "NIM_MODEL_PROFILE") -> Profile:
    """The profile named (or whose id is) `name_or_id`; InvalidArgument naming `field` otherwise."""
    key = ALIASES.get(name_or_id.strip(), name_or_id.strip())
    for p in PROFILES:
        if key in (p.name, p.id):
            return p
    old = _renamed(key)
    if old:
        raise InvalidArgument(field, f"profile {name_or_id!r} was renamed: use {old}")
    raise InvalidArgument(field, f"unknown profile {name_or_id!r}; profiles: {', '.join(p.name for p in PROFILES)} "
                                 "(or a profile id from `dgemma list-profiles`)")


def _renamed(name: str) -> str | None:
    """The new name of a pre-build-stage name such as torch-bfloat16-h100 or tensorrt_llm-fp8-h100."""
    parts = name.split("-")
    if len(parts) != 3 or parts[0] not in ("torch", "tensorrt_llm"):
        return None
    backend = "trtllm" if parts[0] == "tensorrt_llm" else "torch"
    precision = {"float32": "fp32", "bfloat16": "bf16", "float16": "bf16"}.get(parts[1], parts[1])
    if backend == "torch" and precision == "fp32":
        return "torch-fp32-cpu"
    matches = [p.name for p in PROFILES if p.backend == backend and p.precision == precision]
    return matches[0] if matches else None


@dataclass(frozen=True)
class Machine:
    cuda: bool
    compute_capability: tuple[int, int] | None  # of device 0
    device_name: str | None
    tensorrt_llm: bool
    modelopt: bool

    @property
    def describe(self) -> str:
        if not self.cuda:
            return "cpu"
        return f"{self.device_name} (SM{self.compute_capability[0]}{self.compute_capability[1]})"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _torch_cuda_build() -> bool:
    """Whether the installed torch is a CUDA build, read from torch/version.py without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    try:
        text = (Path(next(iter(spec.submodule_search_locations))) / "version.py").read_text()
    except OSError:
        return True  # unknown: ask torch itself
    m = re.search(r"^cuda\b[^=]*=\s*(.+)$", text, re.M)
    return m is None or m.group(1).strip() != "None"


def probe_machine() -> Machine:
    """What this machine has. Imports neither tensorrt_llm nor modelopt (find_spec only), and torch only when it
    is a CUDA build (the serving front stays torch-free on a CPU machine)."""
    cuda, cc, name = False, None, None
    if _torch_cuda_build():
        import torch

        cuda = torch.cuda.is_available()
        cc = tuple(torch.cuda.get_device_capability(0)) if cuda else None
        name = torch.cuda.get_device_name(0) if cuda else None
    return Machine(cuda, cc, name, _importable("tensorrt_llm"), _importable("modelopt"))


def can_build(profile: Profile, machine: Machine) -> tuple[bool, str]:
    """Whether `dgemma build` can produce `profile` here. Building never needs a GPU or tensorrt_llm."""
    if not profile.quantized:
        return True, "plain weights in the profile's dtype"
    if not machine.modelopt:
        return False, "needs nvidia-modelopt (pip install '.[build]')"
    if profile.backend == "trtllm":
        return True, "ModelOpt unified checkpoint + LLM API options (serving needs tensorrt_llm)"
    return True, f"ModelOpt {profile.precision} export (calibrates on cpu)"


def can_run(profile: Profile, machine: Machine) -> tuple[bool, str]:
    """Whether `dgemma serve` can run `profile` natively here (a CPU may still serve a quantized build
    dequantized; that is not counted as running the profile)."""
    if profile.backend == "trtllm" and not machine.tensorrt_llm:
        return False, "needs tensorrt_llm, which is not installed"
    if profile.target == "cpu":
        return True, "cpu"
    if profile.target == "any":
        return True, "cuda" if machine.cuda else "cpu"
    if not machine.cuda:
        return False, f"needs a {profile.target} GPU (SM{''.join(map(str, profile.min_compute_capability))}+); no CUDA"
    refused = fp8_refusal(machine.compute_capability) if profile.precision == "fp8" else None
    if refused:
        return False, refused
    need = profile.min_compute_capability
    if need and machine.compute_capability < need:
        return False, (f"needs SM{need[0]}{need[1]}+, this GPU is SM"
                       f"{machine.compute_capability[0]}{machine.compute_capability[1]}")
    return True, machine.describe


def select_profile(available: Sequence[Profile], machine: Machine) -> Profile:
    """Best runnable of `available`: nvfp4 on SM100+, fp8 on SM90/SM100, bf16 on other GPUs, fp32 on a CPU."""
    order = ("nvfp4", "fp8", "bf16", "fp32") if machine.cuda else ("fp32", "bf16")
    runnable = [p for p in available if can_run(p, machine)[0]]
    for precision in order:
        for backend in ("torch", "trtllm"):  # the verified-on-CPU torch runner before the unverified TRT-LLM one
            for p in runnable:
                if p.precision == precision and p.backend == backend:
                    return p
    names = ", ".join(p.name for p in available) or "none"
    raise InvalidArgument("NIM_MODEL_PROFILE", f"no runnable profile on this machine ({machine.describe}) among: "
                                               f"{names}")
