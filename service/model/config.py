"""The DiffusionGemma text backbone's configuration, read from a Hugging Face `config.json`."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.errors import CheckpointError

log = logging.getLogger(__name__)

ARCHITECTURE = "DiffusionGemmaForBlockDiffusion"
MODEL_TYPE = "diffusion_gemma"
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "silu")


@dataclass(frozen=True)
class LayerSpec:
    """What differs between sliding and global (full) attention layers."""

    sliding: bool
    head_dim: int
    num_kv_heads: int
    rope_theta: float
    rope_type: str  # "default" or "proportional"
    partial_rotary_factor: float
    rope_factor: float

    @property
    def k_eq_v(self) -> bool:
        # Global layers have no v_proj: V is the (unrotated) K projection.
        return not self.sliding


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    sliding_window: int
    rms_norm_eps: float
    final_logit_softcapping: float
    hidden_activation: str
    canvas_length: int
    layers: tuple[LayerSpec, ...]
    pad_token_id: int = 0
    eos_token_ids: tuple[int, ...] = (1,)
    bos_token_id: int = 2
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def embed_scale(self) -> float:
        return self.hidden_size**0.5


def _require(d: dict, key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise CheckpointError(f"config.json: {where}{key} is missing")
    return d[key]


def _as_int_tuple(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, int):
        return (v,)
    return tuple(int(x) for x in v)


def parse_config(raw: dict) -> ModelConfig:
    """Turn a `config.json` dict into a ModelConfig, or raise CheckpointError naming the problem."""
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if model_type != MODEL_TYPE and ARCHITECTURE not in archs:
        raise CheckpointError(
            f"config.json: model_type is {model_type!r} (architectures {archs}); "
            f"expected {MODEL_TYPE!r} / {ARCHITECTURE}"
        )
    tc = raw.get("text_config")
    if not isinstance(tc, dict):
        raise CheckpointError("config.json: text_config is missing or not an object")
    w = "text_config."
    if tc.get("use_bidirectional_attention") == "all":
        raise CheckpointError("config.json: text_config.use_bidirectional_attention='all' is not supported")
    if tc.get("attention_bias"):
        raise CheckpointError("config.json: text_config.attention_bias=true is not supported")
    act = tc.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in SUPPORTED_ACTIVATIONS:
        raise CheckpointError(f"config.json: text_config.hidden_activation {act!r} is not supported")

    num_layers = int(_require(tc, "num_hidden_layers", w))
    layer_types = tc.get("layer_types") or [
        "sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(num_layers)
    ]
    if len(layer_types) != num_layers:
        raise CheckpointError("config.json: text_config.layer_types does not match num_hidden_layers")
    rope = tc.get("rope_parameters") or {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }
    per_layer = {str(k): v for k, v in (tc.get("per_layer_config") or {}).items()}
    head_dim = int(_require(tc, "head_dim", w))
    kv_heads = int(_require(tc, "num_key_value_heads", w))
    layers = []
    for i, lt in enumerate(layer_types):
        if lt not in ("sliding_attention", "full_attention"):
            raise CheckpointError(f"config.json: text_config.layer_types[{i}] {lt!r} is not supported")
        over = per_layer.get(str(i), {})
        rp = rope.get(lt)
        if not isinstance(rp, dict):
            raise CheckpointError(f"config.json: text_config.rope_parameters.{lt} is missing")
        rope_type = rp.get("rope_type", "default")
        if rope_type not in ("default", "proportional"):
            raise CheckpointError(f"config.json: rope_type {rope_type!r} is not supported")
        layers.append(
            LayerSpec(
                sliding=lt == "sliding_attention",
                head_dim=int(over.get("head_dim", head_dim)),
                num_kv_heads=int(over.get("num_key_value_heads", kv_heads)),
                rope_theta=float(rp["rope_theta"]),
                rope_type=rope_type,
                partial_rotary_factor=float(rp.get("partial_rotary_factor", 1.0)),
                rope_factor=float(rp.get("factor", 1.0)),
            )
        )
    num_heads = int(_require(tc, "num_attention_heads", w))
    for i, spec in enumerate(layers):
        if num_heads % spec.num_kv_heads:
            raise CheckpointError(f"config.json: layer {i}: {num_heads} heads not divisible by {spec.num_kv_heads}")
    eos = _as_int_tuple(tc.get("eos_token_id", raw.get("eos_token_id", 1)))
    return ModelConfig(
        vocab_size=int(_require(tc, "vocab_size", w)),
        hidden_size=int(_require(tc, "hidden_size", w)),
        intermediate_size=int(_require(tc, "intermediate_size", w)),
        num_layers=num_layers,
        num_heads=num_heads,
        num_experts=int(_require(tc, "num_experts", w)),
        top_k_experts=int(_require(tc, "top_k_experts", w)),
        moe_intermediate_size=int(_require(tc, "moe_intermediate_size", w)),
        sliding_window=int(_require(tc, "sliding_window", w)),
        rms_norm_eps=float(tc.get("rms_norm_eps", 1e-6)),
        final_logit_softcapping=float(tc.get("final_logit_softcapping") or 30.0),
        hidden_activation=act,
        canvas_length=int(raw.get("canvas_length") or 256),
        layers=tuple(layers),
        pad_token_id=int(tc.get("pad_token_id", 0) or 0),
        eos_token_ids=eos,
        bos_token_id=int(tc.get("bos_token_id", 2) or 2),
        dtype=str(tc.get("dtype") or raw.get("dtype") or raw.get("torch_dtype") or "float32"),
    )


def read_json_object(path: Path) -> dict:
    """A checkpoint's or build's JSON file as a dict; CheckpointError naming the file when it is not one."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path.name} is malformed: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path.name} is malformed: not a JSON object")
    return raw


def read_config(checkpoint_dir: Path) -> ModelConfig:
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"checkpoint has no config.json: {checkpoint_dir}")
    return parse_config(read_json_object(path))


def read_generation_config(checkpoint_dir: Path) -> dict:
    """The checkpoint's generation_config.json (eos/pad ids and sampler defaults), or {}."""
    path = Path(checkpoint_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("ignoring unreadable generation_config.json")
        return {}
    return raw if isinstance(raw, dict) else {}


def special_ids(cfg: ModelConfig, gen: dict) -> tuple[tuple[int, ...], int]:
    """(eos ids, pad id) as the reference's generate resolves them: the EOS ids are generation_config.json's
    `eos_token_id`, and none when it names none (generation then never stops at an EOS, as in
    transformers); the pad id is generation_config.json's, else config.json's."""
    eos = gen.get("eos_token_id")
    eos_ids = tuple(eos if isinstance(eos, list) else [eos]) if eos is not None else ()
    pad = gen.get("pad_token_id")
    return eos_ids, int(pad) if isinstance(pad, int) else cfg.pad_token_id
