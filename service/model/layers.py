"""Building blocks of the DiffusionGemma backbone: norms, RoPE, attention, dense MLP, MoE."""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.model.config import LayerSpec, ModelConfig

log = logging.getLogger(__name__)


def activation(name: str):
    if name == "gelu_pytorch_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    return F.silu


def rms_norm_eager(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """Gemma 4 RMSNorm: float32 math, weight used as is (no 1 + w)."""
    h = x.float()
    h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        h = h * weight.float()
    return h.type_as(x)


class FusedNorm:
    """RMSNorm compiled into one kernel by torch.compile (about 11 norms per layer: unfused, each is ~6 float32
    passes over [rows, H]). Used on CUDA devices only, where it is the default (NIM_FUSED_NORM=0 turns it off);
    UNVERIFIED on a GPU. Compiled at first use (a step's warm-up runs before any CUDA-graph capture); a compile or
    run that fails is logged once and the eager norm is used from then on, so it never fails a request."""

    def __init__(self) -> None:
        self.devices: set[str] = {"cuda"} if os.environ.get("NIM_FUSED_NORM", "1") != "0" else set()
        self._fn = None
        self.failed = False

    def __call__(self, x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
        if self.failed or x.device.type not in self.devices:
            return rms_norm_eager(x, weight, eps)
        try:
            if self._fn is None:
                self._fn = torch.compile(rms_norm_eager, dynamic=True, fullgraph=True)
            return self._fn(x, weight, eps)
        except Exception as e:  # no compiler, an unsupported op: the eager norm from now on
            log.warning("the fused RMSNorm could not be used (%s: %s); running it eagerly",
                        type(e).__name__, str(e)[:200])
            self.failed = True
            return rms_norm_eager(x, weight, eps)


rms_norm = FusedNorm()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, with_scale: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(spec: LayerSpec) -> Tensor:
    """Inverse frequencies [head_dim // 2]; proportional RoPE pads the unrotated angles with zeros."""
    d = spec.head_dim
    if spec.rope_type == "proportional":
        angles = int(spec.partial_rotary_factor * d // 2)
        rotated = 1.0 / (spec.rope_theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / d))
        inv = torch.cat([rotated, torch.zeros(d // 2 - angles)]) if d // 2 > angles else rotated
        return inv / spec.rope_factor
    dim = int(d * spec.partial_rotary_factor)
    return 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """positions [B, T] -> cos, sin [B, T, 1, D] (broadcast over heads)."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, :, None, :], emb.sin().to(dtype)[:, :, None, :]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Projections and norms of one layer. The cache and the masks are the caller's."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec) -> None:
        super().__init__()
        self.spec = spec
        self.num_heads = cfg.num_heads
        d, h = spec.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, spec.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, spec.num_kv_heads * d, bias=False) if spec.sliding else None
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.eps = cfg.rms_norm_eps

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, H] -> q [B, Hq, T, D], k and v [B, Hkv, T, D]."""
        b, t, _ = x.shape
        d = self.spec.head_dim
        q = apply_rope(self.q_norm(self.q_proj(x).view(b, t, -1, d)), cos, sin)
        k_raw = self.k_proj(x).view(b, t, -1, d)
        v_raw = self.v_proj(x).view(b, t, -1, d) if self.v_proj is not None else k_raw
        k = apply_rope(self.k_norm(k_raw), cos, sin)
        v = rms_norm(v_raw, None, self.eps)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool = False) -> Tensor:
        """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], mask [B, 1, Tq|1, Tk] bool or None -> [B, Tq, Hq*D].

        Returns the heads before o_proj.

        Kernel choice follows the reference's SDPA call (GQA in the kernel only without a mask and
        for head dims up to 256), so that single-sequence results match it bit for bit.
        """
        groups = q.shape[1] // k.shape[1]
        gqa = groups > 1 and mask is None and k.shape[-1] <= 256
        if groups > 1 and not gqa and mask is None and not causal:
            return _attend_folded(q, k, v, groups)
        if groups > 1 and not gqa:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=1.0, enable_gqa=gqa)
        b, _, t, _ = out.shape
        return out.transpose(1, 2).reshape(b, t, -1)


    def attend_keys_masked(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor) -> Tensor:
        """Attention where a key is visible to all of a row's queries or to none: key_mask [B, 1, 1, Tk] bool.
        Grouped-query heads are folded (`_attend_folded`), never repeated. q [B, Hq, Tq, D] -> [B, Tq, Hq*D]."""
        return _attend_folded(q, k, v, q.shape[1] // k.shape[1], key_mask)


def _attend_folded(q: Tensor, k: Tensor, v: Tensor, groups: int, key_mask: Tensor | None = None) -> Tensor:
    """Grouped-query attention without repeating K/V: a KV head's `groups` query heads become one head of
    groups * Tq rows (each row sees the same keys, so the rows do not interact; key_mask [B, 1, 1, Tk] applies to
    all of them). For head dims past 256, where SDPA's enable_gqa falls back to its math kernel on CUDA, and for the
    padded batched pass (UNVERIFIED on a GPU). q [B, Hq, Tq, D] -> [B, Tq, Hq*D]."""
    b, hq, t, d = q.shape
    folded = q.reshape(b, k.shape[1], groups * t, d)  # [B, Hkv, G*Tq, D]
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=key_mask, scale=1.0)  # [B, Hkv, G*Tq, D]
    return out.view(b, hq, t, d).transpose(1, 2).reshape(b, t, hq * d)


class DenseMLP(nn.Module):
    def __init__(self, hidden: int, width: int, act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.k = cfg.top_k_experts
        self.root = cfg.hidden_size**-0.5
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [N, H] (the raw residual) -> weights [N, K], expert ids [N, K]."""
        h = rms_norm(x, None, self.eps) * self.scale * self.root
        probs = F.softmax(self.proj(h), dim=-1, dtype=torch.float32)
        w, idx = torch.topk(probs, k=self.k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        return w * self.per_expert_scale[idx], idx


def grouped_linear(x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """Rows of x [S, in], grouped by expert (offsets = cumulative counts), times weight [E, out, in]^T."""
    if hasattr(F, "grouped_mm"):
        try:
            return F.grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
        except (RuntimeError, NotImplementedError):
            pass  # dtype/device without a grouped kernel: loop below
    parts, start = [], 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            parts.append(F.linear(x[start:end], weight[e]))
        start = end
    return torch.cat(parts) if parts else x.new_zeros(0, weight.shape[1])


# Row counts tried when checking that a GEMM gives a row the same bits whatever the count.
_PROBE_ROWS = (*range(1, 65), 96, 128, 200, 256, 333, 512, 777, 1024, 1500, 2048, 3000, 4096)
MAX_SHARED_ROWS = _PROBE_ROWS[-1]


@functools.lru_cache(maxsize=None)
def min_invariant_rows(in_dim: int, out_dim: int, dtype: torch.dtype, device: str, threads: int) -> int | None:
    """The fewest rows from which `grouped_linear` gives each row the same bits for every row count up to
    MAX_SHARED_ROWS, measured on this machine; None when no count up to 64 qualifies.

    BLAS kernels pick their blocking by shape: on this project's CPU, float32 GEMMs under 12 rows
    (4 at one thread) round some rows differently, and from there on a row's bits do not depend on
    the count. Measured rather than assumed, per shape, dtype, device and thread count.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(MAX_SHARED_ROWS, in_dim, generator=g).to(device, dtype)  # [M, in]
    w = torch.randn(1, out_dim, in_dim, generator=g).to(device, dtype)  # [1, out, in]
    run = lambda m: grouped_linear(x[:m], w, torch.tensor([m], dtype=torch.int32, device=device))
    full = run(MAX_SHARED_ROWS)
    least = None
    for m in reversed(_PROBE_ROWS):
        if not torch.equal(run(m), full[:m]):
            break
        least = m
    return least if least is not None and least <= 64 else None


class Experts(nn.Module):
    """The routed experts as 3D weights, computed as grouped matmuls over expert-sorted tokens."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts = e
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        self.act = activation(cfg.hidden_activation)

    def forward(self, x: Tensor, weights: Tensor, idx: Tensor, seq_len: int | None = None) -> Tensor:
        """x [N, H], weights/idx [N, K] -> [N, H]. Summed over k in order, as the reference does.

        seq_len: x holds N // seq_len sequences back to back, and every row gets the bits it would get
        in a pass over its own sequence (see `_calls`). None: one grouped GEMM per projection over all N rows
        (the throughput path; a row's bits may then depend on the other sequences' routing).
        """
        n, k = idx.shape
        flat = idx.reshape(-1)  # [N*K] expert of each assignment
        y = x.new_empty(n * k, x.shape[-1])  # [N*K, H]
        for rows in self._calls(flat, k, seq_len):
            expert_ids, order = torch.sort(flat[rows])
            rows = rows[order]  # [m], sorted by expert
            # histc, not bincount: no host sync, so a GPU step stays capturable as a CUDA graph
            counts = torch.histc(expert_ids.float(), bins=self.num_experts, min=0, max=self.num_experts - 1)
            offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
            h = self.project(x[rows // k], "gate_up_proj", offsets)  # [m, 2I]
            gate, up = h.chunk(2, dim=-1)
            y[rows] = self.project(self.act(gate) * up, "down_proj", offsets)  # [m, H]
        y = y * weights.reshape(-1).unsqueeze(-1)
        return y.view(n, k, -1).sum(dim=1).to(x.dtype)

    def project(self, x: Tensor, which: str, offsets: Tensor) -> Tensor:
        """Expert-sorted rows x times weight `which` ("gate_up_proj" | "down_proj"); FP8Experts overrides it."""
        return grouped_linear(x, getattr(self, which), offsets)

    def min_shared_rows(self) -> int | None:
        """`min_invariant_rows` of both projections at the current thread count; None: nothing is shared."""
        found = [min_invariant_rows(w.shape[2], w.shape[1], w.dtype, str(w.device), torch.get_num_threads())
                 for w in (self.gate_up_proj, self.down_proj)]
        return None if None in found else max(found)

    def _calls(self, flat: Tensor, k: int, seq_len: int | None) -> list[Tensor]:
        """The assignments [N*K] split into grouped-GEMM calls whose per-row bits match a per-sequence pass.

        An expert's rows from every sequence that routes at least `min_invariant_rows` tokens to it share
        one GEMM (a row's bits no longer depend on the count there); the rest run per sequence, as in
        that sequence's own pass. Falls back to one call per sequence when the machine shows no such
        count or an expert's shared rows would pass the checked range, and always off the CPU: the
        split needs host syncs (no CUDA graphs), and sharing is unverified on a GPU.
        """
        total = flat.numel()
        every = torch.arange(total, device=flat.device)
        if seq_len is None or total <= seq_len * k:
            return [every]
        per_seq = seq_len * k
        seqs = total // per_seq
        alone = [every[s * per_seq : (s + 1) * per_seq] for s in range(seqs)]
        if flat.device.type != "cpu":
            return alone
        least = self.min_shared_rows()
        if least is None:
            return alone
        key = (every // per_seq) * self.num_experts + flat  # (sequence, expert) of each assignment
        shared = torch.bincount(key, minlength=seqs * self.num_experts)[key] >= least  # [N*K]
        if int(torch.bincount(flat[shared], minlength=self.num_experts).max()) > MAX_SHARED_ROWS:
            return alone
        calls = [every[shared]] if bool(shared.any()) else []
        return calls + [rows[~shared[rows]] for rows in alone if not bool(shared[rows].all())]


class Layer(nn.Module):
    """One backbone layer. Weights are shared by encoder and decoder mode; only `layer_scalar` is per mode."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.spec = spec
        self.self_attn = Attention(cfg, spec)
        self.mlp = DenseMLP(h, cfg.intermediate_size, cfg.hidden_activation)
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm_1 = RMSNorm(h, eps)
        self.post_feedforward_layernorm_2 = RMSNorm(h, eps)
        self.pre_feedforward_layernorm_2 = RMSNorm(h, eps)
        self.register_buffer("decoder_layer_scalar", torch.ones(1))
        self.register_buffer("encoder_layer_scalar", torch.ones(1))

    def moe(self, x: Tensor, seq_len: int | None = None) -> Tensor:
        """Routed experts over tokens x [N, H] (routing reads the raw residual); seq_len as in Experts."""
        w, idx = self.router(x)
        return self.experts(self.pre_feedforward_layernorm_2(x), w, idx, seq_len)

    def feed_forward(self, x: Tensor, batch_invariant: bool = False) -> Tensor:
        """The residual block after attention: dense MLP in parallel with the MoE. x [B, T, H].

        Default (throughput): every sequence's routed tokens go into one grouped GEMM per projection, so the
        expert weights are read once per layer whatever B is. batch_invariant=True keeps each row's bits those
        of its own sequence's pass (a request's ids do not depend on its batch): experts share GEMMs across
        sequences only where that holds (Experts._calls), at the cost of per-sequence calls.
        """
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(x)))
        moe = self.moe(x.reshape(-1, x.shape[-1]), x.shape[1] if batch_invariant else None).reshape(x.shape)
        moe = self.post_feedforward_layernorm_2(moe)
        return x + self.post_feedforward_layernorm(dense + moe)
