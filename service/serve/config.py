"""`dgemma serve` configuration: NIM-style environment variables, overridden by command-line flags.

Every variable is documented in docs/operations.md. Errors name the variable (or flag) at fault.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from service import DEFAULT_CHECKPOINT
from service.errors import CheckpointError, InvalidArgument, Unavailable
from service.model.build_manifest import MANIFEST, is_build, read_build
from service.front.openai_api import DEFAULT_BODY_TIMEOUT_S
from service.front.server import FrontSettings, TLSConfig
from service.request.dispatch import DEFAULT_TOKENIZER_THREADS
from service.request.limits import DEFAULT_MAX_PROMPT_BYTES, DEFAULT_MAX_PROMPT_TOKENS
from service.serve.profiles import Machine, Profile, can_run, find_profile, probe_machine, select_profile
from service.serve.supervisor import ServeOptions
from service.triton.launcher import LOG_MAX_BYTES, TritonPorts, default_cache_dir, free_port
from service.triton.repository import RepositorySettings

TRUE = ("1", "true", "yes", "on")
# Profile backend -> runner name in service.engine.registry.
RUNNER_OF = {"torch": "torch", "trtllm": "tensorrt_llm"}


@dataclass(frozen=True)
class Serving:
    """What `dgemma serve` runs: the profile, where, in which activation dtype, and how it is labelled."""

    profile: Profile
    device: str
    dtype: str
    label: str  # ListModels.profile and /v1/models: the name, plus "(dequantized on cpu)" when so
    manifest: dict | None  # the checked manifest when serving a build


def resolve_serving(ckpt: Path, requested: str | None, field: str, machine: Machine | None = None) -> Serving:
    """The profile to serve `ckpt` with. A build (manifest.json) is checked file by file and fixes the profile;
    `requested` (a name or id) must then agree. A raw checkpoint serves fp32 on a CPU and bf16 on a GPU unless
    told; quantized profiles need a build."""
    machine = machine or probe_machine()
    wanted = find_profile(requested, field) if requested else None
    manifest = read_build(ckpt) if is_build(ckpt) else None
    if manifest is not None:
        entry = manifest["profile"]
        profile = find_profile(str(entry.get("id", "")), MANIFEST) if isinstance(entry, dict) else None
        if profile is None or entry.get("name") != profile.name:
            raise CheckpointError(f"{MANIFEST}: its profile does not match a known profile")
        if wanted is not None and wanted != profile:
            raise InvalidArgument(field, f"{wanted.name} asked for, but {ckpt.name} is a {profile.name} build; "
                                         "leave it unset or build that profile")
    elif wanted is not None and wanted.quantized:
        raise InvalidArgument(field, f"{wanted.name} serves a build: run `dgemma build --profile {wanted.name}` on "
                                     "this checkpoint and serve the build directory it writes")
    else:
        profile = wanted or select_profile([find_profile("torch-fp32-cpu"), find_profile("torch-bf16-any")], machine)
    ok, why = can_run(profile, machine)
    if profile.backend == "trtllm" and not ok:
        raise Unavailable(f"{profile.name}: {why} (UNVERIFIED backend; serve a torch-* build instead)")
    if profile.precision == "fp8" and machine.cuda and not ok:
        raise Unavailable(f"{profile.name}: {why}")  # no FP8 engine dequantized on a GPU: bf16 is the way there
    device = "cuda" if machine.cuda and profile.target != "cpu" else "cpu"
    native = ok and profile.precision in ("fp8", "nvfp4")  # service.model.fp8_runtime / nvfp4_runtime
    if profile.quantized and not native:
        # Dequantized at load (service.model.quantized); on a CPU in float32, the fast CPU path.
        dtype = "float32" if device == "cpu" else "bfloat16"
        return Serving(profile, device, dtype, f"{profile.name} (dequantized on {device})", manifest)
    return Serving(profile, device, profile.activation_dtype, profile.name, manifest)


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "")
    if raw == "":
        return default
    try:
        v = int(raw)
    except ValueError:
        raise InvalidArgument(name, f"must be an integer, got {raw!r}") from None
    if v < minimum:
        raise InvalidArgument(name, f"must be >= {minimum}, got {v}")
    return v


def _float(env: Mapping[str, str], name: str, default: float, minimum: float | None = None) -> float:
    raw = env.get(name, "")
    try:
        v = float(raw) if raw else default
    except ValueError:
        raise InvalidArgument(name, f"must be a number, got {raw!r}") from None
    if minimum is not None and not v >= minimum:  # NaN too
        raise InvalidArgument(name, f"must be >= {minimum}, got {raw!r}")
    return v


def _finite(env: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    v = _float(env, name, default, minimum)
    if not math.isfinite(v):
        raise InvalidArgument(name, f"must be a finite number, got {env.get(name)!r}")
    return v


def api_keys(env: Mapping[str, str]) -> list[str]:
    """NIM_API_KEYS (comma-separated) and NIM_API_KEYS_FILE (one key per line, # comments)."""
    keys = [k.strip() for k in env.get("NIM_API_KEYS", "").split(",") if k.strip()]
    path = env.get("NIM_API_KEYS_FILE", "")
    if path:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as e:
            raise InvalidArgument("NIM_API_KEYS_FILE", f"cannot read the key file: {e.strerror}") from None
        keys += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not keys:
            raise InvalidArgument("NIM_API_KEYS_FILE", "the key file holds no key")
    return keys


def _chunk_tokens(env: Mapping[str, str]) -> int:
    """NIM_PREFIX_CHUNK_TOKENS: the prefix cache's chunk, a multiple of the KV pool's 16-token blocks."""
    v = _int(env, "NIM_PREFIX_CHUNK_TOKENS", 256, 16)
    if v % 16:
        raise InvalidArgument("NIM_PREFIX_CHUNK_TOKENS", f"must be a multiple of 16, got {v}")
    return v


def tls_config(env: Mapping[str, str]) -> TLSConfig | None:
    mode = env.get("NIM_SSL_MODE", "DISABLED").upper()
    if mode == "DISABLED":
        return None
    if mode not in ("TLS", "MTLS"):
        raise InvalidArgument("NIM_SSL_MODE", f"must be DISABLED, TLS or MTLS, got {mode!r}")
    need = ["NIM_SSL_CERT_PATH", "NIM_SSL_KEY_PATH"] + (["NIM_SSL_CA_CERT_PATH"] if mode == "MTLS" else [])
    for name in need:
        if not env.get(name) or not Path(env[name]).is_file():
            raise InvalidArgument(name, f"NIM_SSL_MODE={mode} needs this file")
    ca = Path(env["NIM_SSL_CA_CERT_PATH"]) if mode == "MTLS" else None
    return TLSConfig(Path(env["NIM_SSL_CERT_PATH"]), Path(env["NIM_SSL_KEY_PATH"]), ca)


def serve_options(env: Mapping[str, str], *, checkpoint: Path | None = None, profile: str | None = None,
                  port: int | None = None, metrics_port: int | None = None, http_port: int | None = None,
                  host: str | None = None,
                  threads: int | None = None, reflection: bool | None = None) -> ServeOptions:
    """Flags (keyword arguments, None when unset) override the environment, which overrides defaults."""
    ckpt = Path(checkpoint or env.get("NIM_MODEL_PATH") or DEFAULT_CHECKPOINT)
    if not (ckpt / "config.json").is_file():
        raise InvalidArgument("checkpoint", f"no checkpoint (config.json) at {ckpt}")
    serving = resolve_serving(ckpt, profile or env.get("NIM_MODEL_PROFILE") or None,
                              "--profile" if profile else "NIM_MODEL_PROFILE")
    cache = Path(env["NIM_CACHE_PATH"]) if env.get("NIM_CACHE_PATH") else default_cache_dir()
    name = env.get("NIM_SERVED_MODEL_NAME") or "diffusiongemma"
    repo = RepositorySettings(
        checkpoint_dir=str(ckpt.resolve()), engine_backend=RUNNER_OF[serving.profile.backend],
        device=serving.device, dtype=serving.dtype, instance_kind="KIND_CPU" if serving.device == "cpu" else "KIND_GPU",
        max_live_canvases=_int(env, "NIM_MAX_LIVE_CANVASES", 16, 1),
        max_engine_queue=_int(env, "NIM_MAX_QUEUED_REQUESTS", 64, 1), threads=threads or 0,
        tile_rows=_int(env, "NIM_SAMPLER_TILE_ROWS", 0), max_memory_bytes=_int(env, "NIM_MAX_MEMORY_BYTES", 0),
        max_prompt_tokens=_int(env, "NIM_MAX_PROMPT_TOKENS", 8192, 1),
        max_request_seconds=_float(env, "NIM_MAX_REQUEST_SECONDS", 600.0, 0.0),
        max_new_tokens_limit=_int(env, "NIM_MAX_NEW_TOKENS_LIMIT", 0),
        max_denoising_steps_limit=_int(env, "NIM_MAX_DENOISING_STEPS_LIMIT", 0),
        engine_step_timeout=_float(env, "NIM_ENGINE_STEP_TIMEOUT", 120.0, 0.0),
        batch_invariant=int(env.get("NIM_BATCH_INVARIANT", "").lower() in TRUE),
        prefix_cache_bytes=_int(env, "NIM_PREFIX_CACHE_BYTES", -1, 0) if env.get("NIM_PREFIX_CACHE_BYTES", "") else -1,
        prefix_chunk_tokens=_chunk_tokens(env),
    ).validate()
    front = FrontSettings(
        checkpoint=ckpt, triton_target="", model_id=name, triton_model=repo.model_name, profile=serving.label,
        host=host or env.get("NIM_SERVER_HOST") or "0.0.0.0",
        port=port if port is not None else _int(env, "NIM_SERVER_PORT", 8000),
        api_keys=api_keys(env), tls=tls_config(env),
        reflection=reflection if reflection is not None else env.get("NIM_GRPC_REFLECTION", "").lower() in TRUE,
        max_inflight=_int(env, "NIM_MAX_CONCURRENT_REQUESTS", 64, 1),
        http_port=http_port if http_port is not None else _int(env, "NIM_HTTP_PORT", 8080),
        http_max_body_bytes=_int(env, "NIM_HTTP_MAX_BODY_BYTES", 1 << 20, 1024),
        max_prompt_bytes=_int(env, "NIM_MAX_PROMPT_BYTES", DEFAULT_MAX_PROMPT_BYTES, 1),
        max_prompt_tokens=_int(env, "NIM_MAX_PROMPT_TOKENS", DEFAULT_MAX_PROMPT_TOKENS, 1),
        stream_buffer=_int(env, "NIM_STREAM_BUFFER", 64, 1),
        max_concurrent_rpcs=_int(env, "NIM_MAX_CONCURRENT_RPCS", 256, 1),
        http_body_timeout_s=_finite(env, "NIM_HTTP_BODY_TIMEOUT", DEFAULT_BODY_TIMEOUT_S, 0.1),
        tokenizer_threads=_int(env, "NIM_TOKENIZER_THREADS", DEFAULT_TOKENIZER_THREADS, 1),
        max_request_seconds=repo.max_request_seconds,
        grpc_max_message_bytes=_int(env, "NIM_GRPC_MAX_MESSAGE_BYTES", 1 << 20, 1024),
    )
    # Triton is internal to the pod: its ports are free ones unless pinned.
    pinned = {"grpc": _int(env, "NIM_TRITON_GRPC_PORT", 0), "http": 0,
              "metrics": _int(env, "NIM_TRITON_METRICS_PORT", 0)}
    tports = TritonPorts(*(pin or free_port() for pin in pinned.values()),
                         movable=tuple(name for name, pin in pinned.items() if not pin))
    front.triton_target = f"127.0.0.1:{tports.grpc}"
    log_path = env.get("NIM_TRITON_LOG_FILE")  # Triton's output goes to our log; a file only when asked
    return ServeOptions(
        front=front, repository=repo, cache_dir=cache, triton_ports=tports,
        metrics_host=host or env.get("NIM_SERVER_HOST") or "0.0.0.0",
        metrics_port=metrics_port if metrics_port is not None else _int(env, "NIM_METRICS_PORT", 8002),
        startup_timeout_s=_float(env, "NIM_STARTUP_TIMEOUT", 300.0),
        shutdown_grace_s=_float(env, "NIM_SHUTDOWN_GRACE_PERIOD", 30.0),
        drain_delay_s=_float(env, "NIM_SHUTDOWN_DRAIN_DELAY", 2.0),
        engine_heartbeat_timeout_s=_float(env, "NIM_ENGINE_HEARTBEAT_TIMEOUT", 5.0, 2.0),
        triton_log=Path(log_path) if log_path else None,
        triton_log_max_bytes=_int(env, "NIM_TRITON_LOG_MAX_BYTES", LOG_MAX_BYTES, 4096),
    )


def from_environ(**flags) -> ServeOptions:
    return serve_options(os.environ, **flags)
