"""Read-ME's pre-gating router: a tiny causal transformer over token ids that picks experts.

It reads token ids only, never backbone hidden states, so it can run ahead of the backbone and
tell the prefetcher which experts the next tokens need. It keeps its own preallocated KV cache
(`RouterCache`); incremental decoding equals recomputing the whole sequence.
This module knows nothing about how the router is trained (see `edge_readme/refactor/`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import RouterConfig
from .errors import ModelFormatError
from .loader import shape_of
from .model import apply_rope, causal_mask, rope_tables

__all__ = ["Router", "RouterCache", "router_tensor_names"]

EPS = 1e-6


class RouterCache(nn.Module):
    """Preallocated router keys and values for `length` positions: [layers, H, S, hd] each."""

    def __init__(self, cfg: RouterConfig, length: int, device=None, dtype=torch.float32):
        super().__init__()
        hd = cfg.dim // cfg.num_heads
        shape = (cfg.num_layers, cfg.num_heads, length, hd)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.length = length


class RouterBlock(nn.Module):
    def __init__(self, cfg: RouterConfig):
        super().__init__()
        d, f = cfg.dim, cfg.ffn_dim
        self.heads = cfg.num_heads
        self.attn_norm = nn.Parameter(torch.ones(d))
        self.wqkv = nn.Parameter(torch.empty(3 * d, d))
        self.wo = nn.Parameter(torch.empty(d, d))
        self.ffn_norm = nn.Parameter(torch.ones(d))
        self.w1 = nn.Parameter(torch.empty(f, d))
        self.w2 = nn.Parameter(torch.empty(d, f))

    def forward(self, x, k_cache, v_cache, pos: int, cos, sin, mask):
        # x: [T, d]; k_cache/v_cache: [H, S, hd] of this block
        T, d = x.shape
        hd = d // self.heads
        h = F.rms_norm(x, (d,), self.attn_norm, EPS)
        q, k, v = F.linear(h, self.wqkv).view(T, 3, self.heads, hd).permute(1, 2, 0, 3)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # [H, T, hd]
        k_cache[:, pos:pos + T] = k
        v_cache[:, pos:pos + T] = v
        keys, values = k_cache[:, :pos + T], v_cache[:, :pos + T]  # [H, S, hd]
        a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        x = x + F.linear(a.transpose(0, 1).reshape(T, d), self.wo)
        h = F.rms_norm(x, (d,), self.ffn_norm, EPS)
        return x + F.linear(F.silu(F.linear(h, self.w1)), self.w2)

    def full(self, x, cos, sin):
        # x: [B, T, d] whole sequences from position 0, no cache (training)
        B, T, d = x.shape
        hd = d // self.heads
        h = F.rms_norm(x, (d,), self.attn_norm, EPS)
        q, k, v = F.linear(h, self.wqkv).view(B, T, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # [B, H, T, hd]
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + F.linear(a.transpose(1, 2).reshape(B, T, d), self.wo)
        h = F.rms_norm(x, (d,), self.ffn_norm, EPS)
        return x + F.linear(F.silu(F.linear(h, self.w1)), self.w2)


class Router(nn.Module):
    """ids [T] -> expert logits [T, E] (global) or [T, L, E] (per_layer routing)."""

    def __init__(self, cfg: RouterConfig, vocab_size: int, num_experts: int,
                 num_backbone_layers: int, routing: str = "global"):
        super().__init__()
        if routing not in ("global", "per_layer"):
            raise ModelFormatError(
                f"router routing is {routing!r}; expected 'global' or 'per_layer'")
        if cfg.dim % cfg.num_heads or (cfg.dim // cfg.num_heads) % 2:
            raise ModelFormatError(f"router dim {cfg.dim} must split into {cfg.num_heads} heads of "
                                   "even size; fix moe.router in config.json")
        self.cfg, self.num_experts, self.routing = cfg, num_experts, routing
        self.num_backbone_layers = num_backbone_layers
        self.embed = nn.Parameter(torch.empty(vocab_size, cfg.dim))
        self.blocks = nn.ModuleList(RouterBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.dim))
        outs = num_experts * (num_backbone_layers if routing == "per_layer" else 1)
        self.head = nn.Parameter(torch.empty(outs, cfg.dim))
        cos, sin = rope_tables(cfg.dim // cfg.num_heads, cfg.max_position, cfg.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    # ---- construction ------------------------------------------------------------------

    @classmethod
    def init_from_embedding(cls, cfg: RouterConfig, backbone_embed: torch.Tensor, num_experts: int,
                            num_backbone_layers: int, routing: str = "global",
                            seed: int = 0) -> "Router":
        """A fresh router whose embedding is the first `dim` columns of the backbone's."""
        r = cls(cfg, backbone_embed.shape[0], num_experts, num_backbone_layers, routing)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in r.parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            cols = min(cfg.dim, backbone_embed.shape[1])  # a narrower backbone fills part
            src = backbone_embed[:, :cols].float()
            r.embed[:, :cols] = src / (src.std() + EPS)  # unit scale whatever the backbone's
            for b in r.blocks:  # residual branches start near zero
                b.wo.mul_(0.1)
                b.w2.mul_(0.1)
        return r

    @classmethod
    def from_tensors(cls, cfg: RouterConfig, num_experts: int, num_backbone_layers: int,
                     routing: str, tensors: dict[str, torch.Tensor], device=None,
                     embed_rows=None) -> "Router":
        """Build from `router.*` tensors (as written by `state_tensors`). embed_rows: a
        `quant.FileRows` to look the embedding up in the file instead of holding it."""
        if "router.embed" not in tensors:
            raise ModelFormatError("model.safetensors has no router tensors (router.embed "
                                   "missing); the MoE folder is incomplete: re-run the refactor")
        with torch.device("meta"):
            r = cls(cfg, shape_of(tensors, "router.embed")[0], num_experts, num_backbone_layers,
                    routing)
        want = dict(r.named_parameters())
        missing = sorted(f"router.{n}" for n in want if f"router.{n}" not in tensors)
        wrong = [f"router.{n}: expected {tuple(p.shape)}, "
                 f"found {shape_of(tensors, 'router.' + n)}"
                 for n, p in want.items()
                 if f"router.{n}" in tensors and shape_of(tensors, f"router.{n}") != p.shape]
        if missing or wrong:
            raise ModelFormatError(f"router tensors do not match moe.router in config.json: "
                                   f"missing {missing}, wrong shapes {wrong}; re-run the refactor")
        if embed_rows is not None:
            del r._parameters["embed"], want["embed"]
        r.load_state_dict({n: tensors[f"router.{n}"].float() for n in want},
                          strict=False, assign=True)
        cos, sin = rope_tables(cfg.dim // cfg.num_heads, cfg.max_position, cfg.rope_theta)
        r.cos, r.sin = cos, sin
        r = r.to(device) if device is not None else r
        if embed_rows is not None:
            r.embed = embed_rows
        return r

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"router.{n}": p.detach().contiguous() for n, p in self.named_parameters()}

    def new_cache(self, length: int, device=None) -> RouterCache:
        if length > self.cfg.max_position:
            raise ValueError(f"router cache length {length} > max_position {self.cfg.max_position}")
        dev = device if device is not None else self.norm.device
        return RouterCache(self.cfg, length, dev, self.norm.dtype)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.embed, torch.Tensor):
            return F.embedding(ids, self.embed)
        return self.embed.rows(ids, self.norm.dtype)  # left in the file

    # ---- forward -----------------------------------------------------------------------

    def forward(self, ids: torch.Tensor, cache: RouterCache | None = None,
                pos: int = 0) -> torch.Tensor:
        """ids: [T] at positions pos..pos+T-1. Without a cache, a throwaway one is used."""
        T = ids.shape[0]
        if cache is None:
            cache = self.new_cache(pos + T)
        if pos + T > cache.length:
            raise ValueError(f"router cache holds {cache.length} positions; asked for {pos + T}")
        x = self._embed(ids)  # [T, d]
        cos, sin = self.cos[pos:pos + T], self.sin[pos:pos + T]
        mask = causal_mask(pos, T, x.device)
        for i, b in enumerate(self.blocks):
            x = b(x, cache.k[i], cache.v[i], pos, cos, sin, mask)
        logits = F.linear(F.rms_norm(x, x.shape[-1:], self.norm, EPS), self.head)
        if self.routing == "per_layer":
            return logits.view(T, self.num_backbone_layers, self.num_experts)  # [T, L, E]
        return logits  # [T, E]

    def forward_batch(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [B, T] whole sequences -> logits [B, T, E] or [B, T, L, E]; no cache (training)."""
        B, T = ids.shape
        x = self._embed(ids)  # [B, T, d]
        for b in self.blocks:
            x = b.full(x, self.cos[:T], self.sin[:T])
        logits = F.linear(F.rms_norm(x, x.shape[-1:], self.norm, EPS), self.head)
        if self.routing == "per_layer":
            return logits.view(B, T, self.num_backbone_layers, self.num_experts)
        return logits

    @torch.no_grad()
    def route(self, ids: torch.Tensor, cache: RouterCache | None = None,
              pos: int = 0) -> torch.Tensor:
        """Expert path per token: LongTensor [T, L] (global routing repeats one index)."""
        choice = self(ids, cache, pos).argmax(-1)  # [T] or [T, L]
        if choice.dim() == 1:
            return choice.unsqueeze(1).expand(-1, self.num_backbone_layers).contiguous()
        return choice

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def router_tensor_names(cfg: RouterConfig) -> list[str]:
    names = ["router.embed", "router.norm", "router.head"]
    for i in range(cfg.num_layers):
        names += [f"router.blocks.{i}.{n}" for n in ("attn_norm", "wqkv", "wo", "ffn_norm",
                                                       "w1", "w2")]
    return names
