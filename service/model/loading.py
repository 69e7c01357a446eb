"""Load Hugging Face DiffusionGemma checkpoints (as `transformers` saves them) into our network."""

from __future__ import annotations

import json
import logging
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from service.errors import CheckpointError, Unavailable
from service.model.config import ModelConfig, read_config
from service.model.fp8_runtime import apply_fp8, fp8_gpu_refusal, fp8_native_reason
from service.model.nvfp4_runtime import apply_nvfp4, nvfp4_native_reason
from service.model.network import DiffusionGemma
from service.model.quantized import EXPERT_KEY, SCALE_SUFFIXES, QuantConfig, dequantize_state, read_quant_config

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_IGNORED = re.compile(r"^(model\.encoder\.(vision_tower|embed_vision)\.|lm_head\.weight$)")
_DEC = "model.decoder."
_ENC_LAYER = re.compile(r"^model\.encoder\.language_model\.layers\.(\d+)\.(.+)$")
_ENC_EMBED = "model.encoder.language_model.embed_tokens.weight"
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F8_E4M3": torch.float8_e4m3fn, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_MAX_HEADER = 100 << 20
_PACKED = (torch.float8_e4m3fn, torch.uint8)  # FP8 weights; NVFP4 e2m1 pairs
_FUSED = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise CheckpointError(f"dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def _safetensor_files(ckpt: Path) -> list[Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"model.safetensors.index.json is malformed: {e}") from None
        files = [ckpt / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise CheckpointError("checkpoint has no *.safetensors weights")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"weight shard {f.name} named by the index is missing")
    return files


def _map_key(key: str) -> str | None:
    """Checkpoint key -> our parameter name; None when the key is ignored (vision, tied copies)."""
    if key.startswith(_DEC):
        name = key[len(_DEC) :]
        name = re.sub(r"^(layers\.\d+\.)layer_scalar$", r"\1decoder_layer_scalar", name)
        name = re.sub(r"^self_conditioning\.(gate_proj|up_proj|down_proj)\.", r"self_conditioning.mlp.\1.", name)
        return name
    m = _ENC_LAYER.match(key)
    if m and m.group(2) == "layer_scalar":
        return f"layers.{m.group(1)}.encoder_layer_scalar"
    return None


def checkpoint_key(name: str) -> str:
    """Our parameter name -> its checkpoint key (the inverse of `_map_key`)."""
    if name.endswith("encoder_layer_scalar"):
        return "model.encoder.language_model." + name.replace("encoder_layer_scalar", "layer_scalar")
    if name.endswith("decoder_layer_scalar"):
        return _DEC + name.replace("decoder_layer_scalar", "layer_scalar")
    return _DEC + name.replace("self_conditioning.mlp.", "self_conditioning.")


def shard_header(path: Path) -> tuple[dict[str, dict], int]:
    """A safetensors file's tensor entries ({key: {dtype, shape, data_offsets}}) and where its data starts."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > _MAX_HEADER:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        for key, e in header.items():
            if e["dtype"] not in _ST_DTYPES:
                raise ValueError(f"{key}: dtype {e['dtype']} is not supported")
        data = max((e["data_offsets"][1] for e in header.values()), default=0)
        if path.stat().st_size < 8 + size + data:
            raise ValueError(f"file is {path.stat().st_size} bytes, its header needs {8 + size + data}")
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise CheckpointError(f"cannot read {path.name}: {e}") from None
    return header, 8 + size


def _read_exact(f, view: memoryview) -> None:
    """Fill `view` from f (unbuffered reads can return short, e.g. past 2 GiB)."""
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise ValueError("file ends inside a tensor")
        done += got


def iter_tensors(path: Path, keys: Callable[[str], bool] = lambda k: True) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one safetensors file whose key passes `keys`, one at a time, each read into its own CPU
    tensor by plain reads (no mmap: mapped pages would count in the process's memory beside the copies)."""
    header, start = shard_header(path)
    with open(path, "rb", buffering=0) as f:
        for key, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):  # in file order
            if not keys(key):
                continue
            begin, end = e["data_offsets"]
            buf = torch.empty(end - begin, dtype=torch.uint8)  # [bytes]
            try:
                f.seek(start + begin)
                _read_exact(f, memoryview(buf.numpy()))
                yield key, buf.view(_ST_DTYPES[e["dtype"]]).reshape(e["shape"])
            except (OSError, ValueError, RuntimeError) as err:
                raise CheckpointError(f"cannot read {path.name}: tensor {key}: {err}") from None


def stored_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as stored (FP8 stays FP8), under our names where they map, else their own."""
    return {_map_key(k) or k: t for f in _safetensor_files(ckpt) for k, t in iter_tensors(f)}


def _assign(model: nn.Module, name: str, t: torch.Tensor) -> None:
    """Put t in place of the (meta) parameter or buffer `name`, keeping its kind."""
    parent, _, leaf = name.rpartition(".")
    mod = model.get_submodule(parent) if parent else model
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(t, requires_grad=mod._parameters[leaf].requires_grad)
    else:
        mod._buffers[leaf] = t


class _Filler:
    """Fills a network built on the meta device (in the serving dtype) one checkpoint tensor at a time, on
    `device`. `keep_quantized`: quantized weights and their scales go to `packed` as stored (our names) for
    the FP8/NVFP4 runtimes instead of being dequantized into the network."""

    def __init__(self, model: nn.Module, device: torch.device, scales: dict[str, torch.Tensor],
                 keep_quantized: bool) -> None:
        self.model, self.device, self.scales, self.keep = model, device, scales, keep_quantized
        self.expected = {k: v for k, v in model.state_dict().items()}  # meta tensors: shapes and dtypes
        self.filled: set[str] = set()
        self.parts: dict[str, set[tuple[int, str]]] = {}  # fused expert weight -> (expert, part) filled
        self.packed: dict[str, torch.Tensor] = {}

    def add(self, name: str, key: str, t: torch.Tensor) -> None:
        """One checkpoint tensor `key` (our name `name`)."""
        m = EXPERT_KEY.match(name)
        if t.dtype in _PACKED and self.keep:
            self.packed[name] = t.to(self.device)
            base, key_base = name[: -len(".weight")], key[: -len(".weight")]
            for suffix in SCALE_SUFFIXES:
                if f"{key_base}{suffix}" in self.scales:
                    self.packed[f"{base}{suffix}"] = self.scales[f"{key_base}{suffix}"].to(self.device)
            self._mark(m, name)
            return
        t = self._dequantized(key, t)
        if m:
            self._expert_part(m, t)
            return
        if name not in self.expected:
            raise CheckpointError(f"checkpoint has tensors this architecture does not know: [{key!r}]")
        meta = self.expected[name]
        if tuple(t.shape) != tuple(meta.shape):
            raise CheckpointError(f"tensor {name}: shape {tuple(t.shape)} does not match config {tuple(meta.shape)}")
        _assign(self.model, name, t.to(self.device, meta.dtype))
        self.filled.add(name)

    def _dequantized(self, key: str, t: torch.Tensor) -> torch.Tensor:
        base = key[: -len(".weight")] if key.endswith(".weight") else None
        scale = self.scales.get(f"{base}.weight_scale") if base else None
        if scale is None:
            if t.dtype in _PACKED:
                raise CheckpointError(f"tensor {key} is quantized ({t.dtype}) but has no weight_scale")
            return t
        return dequantize_state({key: t, **{f"{base}{s}": self.scales[f"{base}{s}"] for s in SCALE_SUFFIXES
                                            if f"{base}{s}" in self.scales}})[key]

    def _mark(self, m: re.Match | None, name: str) -> None:
        if m:
            self.parts.setdefault(f"{m.group(1)}.{_FUSED[m.group(3)]}", set()).add((int(m.group(2)), m.group(3)))
        else:
            self.filled.add(name)

    def _expert_part(self, m: re.Match, t: torch.Tensor) -> None:
        """One expert's gate/up/down [out, in] into the fused [E, 2I, H] or [E, H, I] weight (gate rows first)."""
        fused, e, part = f"{m.group(1)}.{_FUSED[m.group(3)]}", int(m.group(2)), m.group(3)
        if fused not in self.expected:
            raise CheckpointError(f"checkpoint has tensors this architecture does not know: [{fused!r}]")
        if fused not in self.filled | set(self.parts):
            meta = self.expected[fused]
            _assign(self.model, fused, torch.empty(meta.shape, dtype=meta.dtype, device=self.device))
        dst = self.model.get_parameter(fused)  # [E, out, in]
        if e >= dst.shape[0]:
            raise CheckpointError(f"{m.group(1)}: expert {e} is past the config's {dst.shape[0]} experts")
        rows = dst.shape[1] // 2
        view = dst.data[e] if part == "down_proj" else dst.data[e, :rows] if part == "gate_proj" else dst.data[e, rows:]
        if tuple(t.shape) != tuple(view.shape):
            raise CheckpointError(f"tensor {m.group(0)}: shape {tuple(t.shape)} does not match config "
                                  f"{tuple(view.shape)}")
        view.copy_(t)
        self._mark(m, m.group(0))

    def missing(self) -> list[str]:
        """Our tensors the checkpoint did not provide (a fused expert weight needs every expert's parts)."""
        out = []
        for name, meta in self.expected.items():
            done = self.parts.get(name)
            if done is not None:
                need = {"down_proj"} if name.endswith("down_proj") else {"gate_proj", "up_proj"}
                if {(e, p) for e in range(meta.shape[0]) for p in need} - done:
                    out.append(name)
            elif name not in self.filled:
                out.append(name)
        return out


def load_state(ckpt: Path, model: DiffusionGemma, device: str | torch.device = "cpu",
               keep_quantized: bool = False) -> dict[str, torch.Tensor]:
    """Fill `model` (built on the meta device in the serving dtype) from the checkpoint, shard by shard and
    tensor by tensor, each straight to `device` in its parameter's dtype; checks every tensor is present.

    Quantized builds are dequantized tensor by tensor, or with `keep_quantized` returned packed as stored
    (our names: the input of apply_fp8/apply_nvfp4), on `device`. Returns those packed tensors ({} otherwise).
    """
    files = _safetensor_files(ckpt)
    is_scale = lambda k: k.endswith(SCALE_SUFFIXES)
    scales = {k: t for f in files for k, t in iter_tensors(f, is_scale)}  # small: read before the weights
    filler = _Filler(model, torch.device(device), scales, keep_quantized)
    wanted = lambda k: not is_scale(k) and (k == _ENC_EMBED or _map_key(k) is not None)
    skipped = [k for f in files for k in shard_header(f)[0] if not is_scale(k) and not wanted(k)]  # never read
    ignored = [k for k in skipped if _IGNORED.match(k) or _ENC_LAYER.match(k)]
    unexpected = [k for k in skipped if k not in ignored]
    for f in files:
        for key, t in iter_tensors(f, wanted):
            name = _map_key(key)
            if key == _ENC_EMBED:  # tied copy: used when the decoder's own is absent (a later one replaces it)
                if "embed_tokens.weight" not in filler.filled:
                    filler.add("embed_tokens.weight", key, t)
            elif name not in filler.expected and not EXPERT_KEY.match(name):
                unexpected.append(key)
            else:
                filler.add(name, key, t)
    if any(k.startswith("model.encoder.vision_tower.") for k in ignored):
        log.info("ignoring the vision tower (%d tensors): text serving only", len(ignored))
    if unexpected:
        raise CheckpointError(f"checkpoint has tensors this architecture does not know: {unexpected[:5]}")
    missing = filler.missing()
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")
    return filler.packed


def load_model(
    checkpoint_dir: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
    keep_quantized: bool | None = None,
) -> tuple[ModelConfig, DiffusionGemma]:
    """Read config and weights; returns the config and an eval-mode network on `device`.

    No float32 master copy: the network is built on the meta device, cast (still meta) to the serving dtype, and
    every checkpoint tensor goes straight to `device` in that dtype as it is read. `keep_quantized`: an FP8/NVFP4
    build keeps its packed weights (None: where `device` runs their kernels; True also on a CPU, whose FP8 path
    loops per expert: the benchmarks' and tests' check of the GPU loading path).
    """
    ckpt = Path(checkpoint_dir)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint directory does not exist: {ckpt}")
    cfg = read_config(ckpt)
    torch_dtype = resolve_dtype(dtype or cfg.dtype)
    dev = torch.device(device)
    with torch.device("meta"):
        model = DiffusionGemma(cfg).to(torch_dtype)  # [no memory]: shapes and dtypes only
    quant = read_quant_config(ckpt)
    runtime = _native_runtime(quant, dev, keep_quantized)
    packed = load_state(ckpt, model, dev, keep_quantized=runtime is not None)
    model.reset_buffers()  # RoPE and embed scale are not in the checkpoint; keep them float32
    model.eval()
    if runtime is not None:
        # UNVERIFIED on a GPU (none here): FP8/NVFP4 weights stay packed; everything else is as loaded above.
        swapped = runtime(model, packed, device=dev)
        if dev.type == "cuda":
            torch.cuda.empty_cache()  # UNVERIFIED on a GPU: stacking transients back to the driver before budgeting
        log.info("%s build on %s: %d modules run %s kernels (unverified on GPU)", quant.quant_algo, dev, swapped,
                 quant.quant_algo)
    return cfg, model


def _native_runtime(quant: QuantConfig | None, device: torch.device, keep: bool | None) -> Callable | None:
    """apply_fp8 or apply_nvfp4 when the build's packed weights are kept on `device`, else None (dequantized)."""
    if quant is None or keep is False:
        return None
    fp8 = quant.quant_algo.startswith("FP8")
    refused = fp8_gpu_refusal(device) if fp8 else None
    if refused:  # an FP8 engine dequantized on such a GPU would only be a slower bf16 one
        raise Unavailable(f"FP8 build: {refused}")
    reason = (fp8_native_reason if fp8 else nvfp4_native_reason)(device)
    if reason is not None and not keep:
        log.info("%s build dequantized at load: %s", quant.quant_algo, reason)
        return None
    return apply_fp8 if fp8 else apply_nvfp4
