"""Batched, differentiable Llama math over a tensor dict, for the offline refactoring.

The runtime's `edge_readme/model.py` runs one sequence with a KV cache and frozen parameters; the
refactoring needs whole batches [B, T] layer by layer (refit) and gradients (fine-tuning), so it
has this small functional twin. It must compute exactly what model.py computes.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from edge_readme.config import ModelConfig
from edge_readme.model import apply_rope, rope_tables


@dataclass
class Backbone:
    """Dense weights (HF names) plus RoPE tables for sequences up to `length`."""

    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def create(cls, config: ModelConfig, tensors: dict[str, torch.Tensor], length: int):
        cos, sin = rope_tables(config.head_dim, length, config.rope_theta)
        return cls(config, dict(tensors), cos, sin)  # read a lazy loader's weights once

    def w(self, layer: int, name: str) -> torch.Tensor:
        return self.tensors[f"model.layers.{layer}.{name}.weight"]

    def b(self, layer: int, name: str) -> torch.Tensor | None:
        return self.tensors.get(f"model.layers.{layer}.{name}.bias")  # qwen2's q/k/v

    @property
    def dtype(self) -> torch.dtype:
        return self.cos.dtype

    def to(self, dtype: torch.dtype) -> "Backbone":
        """A copy for inference passes in `dtype` (the float32 original stays the master)."""
        if dtype == self.dtype:
            return self
        return replace(self, tensors={n: t.to(dtype) for n, t in self.tensors.items()},
                       cos=self.cos.to(dtype), sin=self.sin.to(dtype))


@functools.lru_cache(maxsize=1)
def fast_dtype() -> torch.dtype:
    """bfloat16 where this CPU multiplies it clearly faster than float32 (AVX512-BF16, AMX), else
    float32. Used for the no-grad passes (statistics, targets, refit inputs), never for solves."""
    a, w = torch.randn(512, 576), torch.randn(1536, 576)

    def best(dt: torch.dtype) -> float:
        x, y = a.to(dt), w.to(dt)
        F.linear(x, y)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            F.linear(x, y)
            times.append(time.perf_counter() - t)
        return min(times)

    return torch.bfloat16 if best(torch.bfloat16) < 0.6 * best(torch.float32) else torch.float32


def embed(bb: Backbone, ids: torch.Tensor) -> torch.Tensor:
    return F.embedding(ids, bb.tensors["model.embed_tokens.weight"])  # [B, T, D]


def attention_block(bb: Backbone, layer: int, x: torch.Tensor) -> torch.Tensor:
    """x: [B, T, D] residual stream -> residual after attention."""
    c, (B, T, _) = bb.config, x.shape
    h = F.rms_norm(x, x.shape[-1:], bb.w(layer, "input_layernorm"), c.rms_eps)
    q, k, v = (F.linear(h, bb.w(layer, f"self_attn.{n}_proj"), bb.b(layer, f"self_attn.{n}_proj"))
               for n in "qkv")
    q = q.view(B, T, c.num_heads, c.head_dim)
    k, v = k.view(B, T, c.num_kv_heads, c.head_dim), v.view(B, T, c.num_kv_heads, c.head_dim)
    cos, sin = bb.cos[:T], bb.sin[:T]
    q = apply_rope(q.transpose(1, 2), cos, sin)  # [B, H, T, hd]
    k = apply_rope(k.transpose(1, 2), cos, sin)
    a = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True, enable_gqa=True)
    return x + F.linear(a.transpose(1, 2).reshape(B, T, c.q_dim), bb.w(layer, "self_attn.o_proj"))


def ffn_input(bb: Backbone, layer: int, x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, x.shape[-1:], bb.w(layer, "post_attention_layernorm"), bb.config.rms_eps)


def swiglu(h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(F.linear(h, gate)) * F.linear(h, up)  # [..., rows]


def dense_act(bb: Backbone, layer: int, h: torch.Tensor) -> torch.Tensor:
    return swiglu(h, bb.w(layer, "mlp.gate_proj"), bb.w(layer, "mlp.up_proj"))  # [..., F]


def dense_down(bb: Backbone, layer: int, act: torch.Tensor) -> torch.Tensor:
    return F.linear(act, bb.w(layer, "mlp.down_proj"))


def dense_ffn(bb: Backbone, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The dense FFN's contribution to the residual stream x [..., D]."""
    return dense_down(bb, layer, dense_act(bb, layer, ffn_input(bb, layer, x)))


def mean_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood of ids [B, T] under logits [B, T, V]."""
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()))


def logits(bb: Backbone, x: torch.Tensor) -> torch.Tensor:
    t = bb.tensors
    x = F.rms_norm(x, x.shape[-1:], t["model.norm.weight"], bb.config.rms_eps)
    return F.linear(x, t.get("lm_head.weight", t["model.embed_tokens.weight"]))


def dense_forward(bb: Backbone, ids: torch.Tensor, hook=None,
                  head: bool = True) -> torch.Tensor:
    """ids [B, T] -> logits [B, T, V] (hidden [B, T, D] without the head); hook(layer,
    act [B, T, F]) sees each down_proj input."""
    x = embed(bb, ids)
    for i in range(bb.config.num_layers):
        x = attention_block(bb, i, x)
        act = dense_act(bb, i, ffn_input(bb, i, x))
        if hook is not None:
            hook(i, act)
        x = x + dense_down(bb, i, act)
    return logits(bb, x) if head else x


# ---- the MoE FFN -------------------------------------------------------------------------


@dataclass
class MoELayer:
    """One layer's Read-ME FFN in the separate layout; each weight is [rows, D]."""

    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # gate, up, down_t
    experts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

    def parameters(self) -> list[torch.Tensor]:
        return [*self.shared, *(w for e in self.experts for w in e)]

    def to(self, dtype: torch.dtype) -> "MoELayer":
        return MoELayer(tuple(w.to(dtype) for w in self.shared),  # type: ignore[arg-type]
                        [tuple(w.to(dtype) for w in e) for e in self.experts])  # type: ignore


def slice_layer(bb: Backbone, layer: int, shared_idx: torch.Tensor,
                expert_idx: list[torch.Tensor]) -> MoELayer:
    """Gate/up rows and down columns picked out of the dense FFN by neuron index."""
    g, u = bb.w(layer, "mlp.gate_proj"), bb.w(layer, "mlp.up_proj")
    d_t = bb.w(layer, "mlp.down_proj").t()  # [F, D]

    def pick(idx, dup: torch.Tensor | None = None):
        down = d_t[idx].clone()
        if dup is not None:
            down[torch.isin(idx, dup)] = 0.0  # placeholder rows that repeat a shared neuron
        return (g[idx].clone(), u[idx].clone(), down)

    return MoELayer(pick(shared_idx), [pick(idx, shared_idx) for idx in expert_idx])


def moe_ffn(layer: MoELayer, h: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
    """h: [N, D] FFN input; route: [N] expert per token -> [N, D]."""
    g, u, d = layer.shared
    out = swiglu(h, g, u) @ d
    for e, (g, u, d) in enumerate(layer.experts):
        idx = (route == e).nonzero().squeeze(1)  # [N_e]
        if idx.numel():
            out = out.index_add(0, idx, swiglu(h.index_select(0, idx), g, u) @ d)  # [N_e, D]
    return out


def moe_forward(bb: Backbone, layers: list[MoELayer], ids: torch.Tensor,
                route: torch.Tensor) -> torch.Tensor:
    """ids [B, T], route [B, T, L] -> logits [B, T, V]."""
    B, T = ids.shape
    x = embed(bb, ids)
    for i, layer in enumerate(layers):
        x = attention_block(bb, i, x)
        h = ffn_input(bb, i, x).reshape(B * T, -1)
        x = x + moe_ffn(layer, h, route[..., i].reshape(-1)).view(B, T, -1)
    return logits(bb, x)
