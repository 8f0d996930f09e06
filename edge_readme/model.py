"""The Llama forward pass: RMSNorm, RoPE, grouped-query attention, SwiGLU, dense or Read-ME MoE FFN.

No I/O and no cache policy live here. A MoE layer asks for expert weights through one call,
`experts.get(layer, expert)`, a context manager that yields resident weights; loading and eviction
are the provider's business.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


@dataclass(frozen=True)
class ExpertWeights:
    """One expert's weights as the MoE layer uses them (for a cache: views into a slot)."""

    gate: torch.Tensor  # [rows, D]
    up: torch.Tensor  # [rows, D]
    down_t: torch.Tensor  # [rows, D]: down_proj columns, transposed


class ExpertProvider(Protocol):
    def get(self, layer: int, expert: int) -> AbstractContextManager[ExpertWeights]: ...


ActivationHook = Callable[[int, torch.Tensor], None]  # (layer, down_proj input [T, F])


@dataclass
class Int8Weight:
    """A [out, in] weight as int8 rows with one scale per row (weight-only quantization)."""

    q: torch.Tensor  # [out, in] int8
    scale: torch.Tensor  # [out], compute dtype

    @staticmethod
    def eligible(shape: tuple[int, ...]) -> bool:
        """The CPU kernel needs the input width in blocks of 32 (else it crashes on batches)."""
        return len(shape) == 2 and shape[1] % 32 == 0

    @classmethod
    def quantize(cls, w: torch.Tensor) -> "Int8Weight":
        scale = w.float().abs().amax(-1).clamp(min=1e-12) / 127.0  # [out]
        q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q.contiguous(), scale.to(w.dtype))

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes


Weight = torch.Tensor | Int8Weight


def linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    if isinstance(w, Int8Weight):  # CPU int8 weight-only kernel; x in the scales' dtype
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), w.q, w.scale)
        return y.view(*x.shape[:-1], -1)
    return F.linear(x, w)


def embedding(ids: torch.Tensor, w: Weight) -> torch.Tensor:
    if isinstance(w, Int8Weight):
        return w.q[ids].to(w.scale.dtype) * w.scale[ids, None]  # [T, D]
    return F.embedding(ids, w)


def rope_tables(head_dim: int, length: int, theta: float, device=None, dtype=torch.float32):
    dims = torch.arange(0, head_dim, 2, device=device, dtype=torch.float64)
    inv = 1.0 / theta ** (dims / head_dim)
    ang = torch.outer(torch.arange(length, device=device, dtype=torch.float64), inv)  # [S, hd/2]
    ang = torch.cat([ang, ang], dim=-1)  # [S, hd]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def causal_mask(pos: int, T: int, device=None) -> torch.Tensor | None:
    """Queries at pos..pos+T-1 see keys 0..their own position: [T, pos + T]; None for one query."""
    if T == 1:
        return None
    q_pos = torch.arange(pos, pos + T, device=device).unsqueeze(1)
    return torch.arange(pos + T, device=device).unsqueeze(0) <= q_pos


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [H, T, hd]; cos/sin: [T, hd]; rotate-half (Hugging Face) layout
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


class KVCache(nn.Module):
    """Preallocated keys and values for `length` positions: [L, Hkv, S, hd] each."""

    def __init__(self, config: ModelConfig, length: int, device=None, dtype=torch.float32):
        super().__init__()
        shape = (config.num_layers, config.num_kv_heads, length, config.head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.length = length

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.wqkv = nn.Parameter(torch.empty(c.q_dim + 2 * c.kv_dim, c.hidden_size),
                                 requires_grad=False)
        self.wo = nn.Parameter(torch.empty(c.hidden_size, c.q_dim), requires_grad=False)
        self.bqkv = nn.Parameter(torch.empty(c.q_dim + 2 * c.kv_dim), requires_grad=False) \
            if c.attention_bias else None  # qwen2

    def forward(self, x, layer: int, cache: KVCache, pos: int, cos, sin, mask):
        c, T = self.c, x.shape[0]
        qkv = linear(x, self.wqkv)  # [T, q + 2kv]
        if self.bqkv is not None:
            qkv = qkv + self.bqkv
        q, k, v = qkv.split([c.q_dim, c.kv_dim, c.kv_dim], dim=-1)
        q = apply_rope(q.view(T, c.num_heads, c.head_dim).transpose(0, 1), cos, sin)  # [H, T, hd]
        k = apply_rope(k.view(T, c.num_kv_heads, c.head_dim).transpose(0, 1), cos, sin)
        v = v.view(T, c.num_kv_heads, c.head_dim).transpose(0, 1)
        cache.k[layer, :, pos:pos + T] = k
        cache.v[layer, :, pos:pos + T] = v
        keys, values = cache.k[layer, :, :pos + T], cache.v[layer, :, :pos + T]  # [Hkv, S, hd]
        if keys.dtype != q.dtype:
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        return linear(out.transpose(0, 1).reshape(T, c.q_dim), self.wo)


class DenseFFN(nn.Module):
    def __init__(self, c: ModelConfig, rows: int | None = None):
        super().__init__()
        rows = c.intermediate_size if rows is None else rows
        self.rows = rows
        self.w_gate_up = nn.Parameter(torch.empty(2 * rows, c.hidden_size), requires_grad=False)
        self.w_down = nn.Parameter(torch.empty(c.hidden_size, rows), requires_grad=False)

    def act(self, x: torch.Tensor) -> torch.Tensor:
        g, u = linear(x, self.w_gate_up).chunk(2, dim=-1)
        return F.silu(g) * u  # [T, F]

    def forward(self, x, layer: int, hook: ActivationHook | None = None):
        h = self.act(x)
        if hook is not None:
            hook(layer, h)
        return linear(h, self.w_down)


def expert_ffn(x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    h = F.silu(F.linear(x, w.gate)) * F.linear(x, w.up)  # [T_e, rows]
    return h @ w.down_t  # [T_e, D]


class MoEFFN(nn.Module):
    """Read-ME's separate layout: a shared expert for every token, plus one routed expert each."""

    def __init__(self, c: ModelConfig, shared_rows: int):
        super().__init__()
        self.shared = DenseFFN(c, shared_rows)
        self.experts: ExpertProvider | None = None

    def forward(self, x, layer: int, route: torch.Tensor, order: Iterable[int] | None = None):
        # x: [T, D]; route: [T] expert index of each token at this layer, on the CPU (no syncs)
        out = self.shared(x, layer)
        assert self.experts is not None, "MoE layer used before an expert provider was attached"
        if x.shape[0] == 1:
            with self.experts.get(layer, int(route[0])) as w:
                return out + expert_ffn(x, w)
        groups = order if order is not None else torch.unique(route).tolist()
        for e in groups:
            idx = (route == e).nonzero().squeeze(1).to(x.device)  # [T_e]
            if idx.numel() == 0:
                continue
            with self.experts.get(layer, e) as w:
                out.index_add_(0, idx, expert_ffn(x.index_select(0, idx), w))  # [T_e, D] -> [T, D]
        return out


class Block(nn.Module):
    def __init__(self, c: ModelConfig, layer: int, shared_rows: int | None):
        super().__init__()
        self.layer = layer
        self.attn_norm = nn.Parameter(torch.empty(c.hidden_size), requires_grad=False)
        self.ffn_norm = nn.Parameter(torch.empty(c.hidden_size), requires_grad=False)
        self.attn = Attention(c)
        self.ffn = DenseFFN(c) if shared_rows is None else MoEFFN(c, shared_rows)
        self.eps = c.rms_eps

    def forward(self, x, cache, pos, cos, sin, mask, route=None, order=None, hook=None):
        x = x + self.attn(F.rms_norm(x, x.shape[-1:], self.attn_norm, self.eps),
                          self.layer, cache, pos, cos, sin, mask)
        h = F.rms_norm(x, x.shape[-1:], self.ffn_norm, self.eps)
        if isinstance(self.ffn, MoEFFN):
            return x + self.ffn(h, self.layer, route, order)
        return x + self.ffn(h, self.layer, hook)


class Transformer(nn.Module):
    def __init__(self, c: ModelConfig, rope_length: int | None = None):
        super().__init__()
        self.c = c
        shared = c.moe.shared_sizes if c.moe is not None else None
        self.embed = nn.Parameter(torch.empty(c.vocab_size, c.hidden_size), requires_grad=False)
        self.layers = nn.ModuleList(
            Block(c, i, None if shared is None else shared[i]) for i in range(c.num_layers))
        self.norm = nn.Parameter(torch.empty(c.hidden_size), requires_grad=False)
        self.lm_head = None if c.tie_embeddings else nn.Parameter(
            torch.empty(c.vocab_size, c.hidden_size), requires_grad=False)
        cos, sin = rope_tables(c.head_dim, rope_length or c.max_position, c.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def quantize_int8(self) -> None:
        """Int8 weight-only for the resident projections, embedding and head (CPU decode)."""
        for mod in self.modules():
            for name in ("wqkv", "wo", "w_gate_up", "w_down", "embed", "lm_head"):
                p = mod._parameters.get(name)
                if p is not None and Int8Weight.eligible(tuple(p.shape)):
                    del mod._parameters[name]
                    setattr(mod, name, Int8Weight.quantize(p.data))

    def weight_bytes(self) -> int:
        """Bytes of every weight and buffer, quantized ones included."""
        total = sum(p.nbytes for p in self.parameters()) + sum(b.nbytes for b in self.buffers())
        return total + sum(v.nbytes for m in self.modules() for v in vars(m).values()
                           if isinstance(v, Int8Weight))

    def attach_experts(self, provider: ExpertProvider) -> None:
        for block in self.layers:
            if isinstance(block.ffn, MoEFFN):
                block.ffn.experts = provider

    def forward(self, tokens: torch.Tensor, cache: KVCache, pos: int,
                route: torch.Tensor | None = None, order: list[list[int]] | None = None,
                hook: ActivationHook | None = None, all_logits: bool = False,
                after_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """tokens: [T] at positions pos..pos+T-1. route: [T, L] expert per token per layer (MoE).
        order: per layer, the order in which to run expert groups. Returns logits [T or 1, V]."""
        T = tokens.shape[0]
        x = embedding(tokens, self.embed)  # [T, D]
        cos, sin = self.cos[pos:pos + T], self.sin[pos:pos + T]
        mask = causal_mask(pos, T, x.device)
        for i, block in enumerate(self.layers):
            r = None if route is None else route[:, i]
            x = block(x, cache, pos, cos, sin, mask, r, None if order is None else order[i], hook)
            if after_layer is not None:
                after_layer(i)
        if not all_logits:
            x = x[-1:]
        x = F.rms_norm(x, x.shape[-1:], self.norm, self.c.rms_eps)
        return linear(x, self.embed if self.lm_head is None else self.lm_head)


def build_transformer(c: ModelConfig, tensors: dict[str, torch.Tensor], device, dtype,
                      rope_length: int | None = None) -> Transformer:
    """Build on the meta device, then assign real tensors (no throwaway random init)."""
    with torch.device("meta"):
        model = Transformer(c, rope_length)
    cos, sin = rope_tables(c.head_dim, rope_length or c.max_position, c.rope_theta, device, dtype)

    def put(t: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(t.to(device=device, dtype=dtype).contiguous(), requires_grad=False)

    model.embed = put(tensors["model.embed_tokens.weight"])
    model.norm = put(tensors["model.norm.weight"])
    if model.lm_head is not None:
        model.lm_head = put(tensors["lm_head.weight"])
    for i, b in enumerate(model.layers):
        p = f"model.layers.{i}."
        b.attn_norm = put(tensors[p + "input_layernorm.weight"])
        b.ffn_norm = put(tensors[p + "post_attention_layernorm.weight"])
        b.attn.wqkv = put(torch.cat([tensors[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]))
        b.attn.wo = put(tensors[p + "self_attn.o_proj.weight"])
        if c.attention_bias:
            b.attn.bqkv = put(torch.cat([tensors[p + f"self_attn.{n}_proj.bias"] for n in "qkv"]))
        ffn = b.ffn.shared if isinstance(b.ffn, MoEFFN) else b.ffn
        mlp = p + ("mlp.shared." if isinstance(b.ffn, MoEFFN) else "mlp.")
        ffn.w_gate_up = put(torch.cat([tensors[mlp + "gate_proj.weight"],
                                       tensors[mlp + "up_proj.weight"]]))
        ffn.w_down = put(tensors[mlp + "down_proj.weight"])
    model.cos, model.sin = cos, sin
    return model
