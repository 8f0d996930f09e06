"""The Llama forward pass: RMSNorm, RoPE, grouped-query attention, SwiGLU, dense or Read-ME MoE FFN.

No I/O and no cache policy live here. A MoE layer asks for expert weights through one call,
`experts.get(layer, expert)`, a context manager that yields resident weights; loading and eviction
are the provider's business.
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .loader import row_source, shape_of
from .quant import FileRows, Weight, convert, embedding, linear, nbytes
from .rowfile import RowFile


@dataclass(frozen=True)
class ExpertWeights:
    """One expert's weights as the MoE layer uses them (for a cache: views into a slot)."""

    gate_up: Weight  # [2 rows, D]: gate_proj rows, then up_proj rows
    down: Weight  # [D, rows]


class ExpertProvider(Protocol):
    def get(self, layer: int, expert: int) -> AbstractContextManager[ExpertWeights]: ...


ActivationHook = Callable[[int, torch.Tensor], None]  # (layer, down_proj input [T, F])


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
    """Preallocated keys and values for `length` positions: [L, Hkv, S, hd] each.

    `KVCache.pool(n, ...)`: n caches in one buffer ([n, L, Hkv, S, hd]), so that a batched decode
    step writes and reads every sequence's keys in one indexing op each."""

    def __init__(self, config: ModelConfig, length: int, device=None, dtype=torch.float32,
                 pool: nn.Module | None = None, index: int = 0):
        super().__init__()
        shape = (config.num_layers, config.num_kv_heads, length, config.head_dim)
        if pool is None:
            k = torch.zeros(shape, device=device, dtype=dtype)
            v = torch.zeros(shape, device=device, dtype=dtype)
        else:  # a view of one entry of the pool (the pool is a submodule: freed with it)
            k, v = pool.k[index], pool.v[index]
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)
        self.length, self.index = length, index
        self.pooled = pool

    @classmethod
    def pool(cls, config: ModelConfig, n: int, length: int, device=None,
             dtype=torch.float32) -> list["KVCache"]:
        shape = (n, config.num_layers, config.num_kv_heads, length, config.head_dim)
        whole = nn.Module()
        for name in ("k", "v"):
            whole.register_buffer(name, torch.zeros(shape, device=device, dtype=dtype),
                                  persistent=False)
        return [cls(config, length, pool=whole, index=i) for i in range(n)]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     lengths: list[int]) -> torch.Tensor:
    """One query per head for each of B sequences: q [B, H, hd], keys/values [B, Hkv, S, hd];
    sequence b sees its first lengths[b] keys (the rest is padding) -> [B, H, hd].

    Grouped heads share their keys through a view (SDPA's GQA path on the CPU copies them: 3x
    slower here). A bfloat16 cache is read in q's dtype, as the prompt's path reads it. Each
    sequence's result is bit-for-bit the same alone or padded in a batch of any size (on the
    CPU; tests/test_batched_decode.py checks it): the scores are K q^T (each score one dot
    product whatever the shape; q K^T rounds differently as S changes), and a caller pads every
    row to at least `MIN_KEYS` keys (the softmax sums rows shorter than a vector differently)."""
    B, H, hd = q.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    keys = keys.to(q.dtype).reshape(B * Hkv, S, hd)
    values = values.to(q.dtype).reshape(B * Hkv, S, hd)
    qg = q.reshape(B * Hkv, H // Hkv, hd)
    scores = torch.bmm(keys, qg.transpose(1, 2)).transpose(1, 2).contiguous()  # [B Hkv, g, S]
    scores.mul_(hd ** -0.5)
    if min(lengths) < S:
        scores.view(B, Hkv, -1, S).masked_fill_(
            _padding(S, tuple(lengths), q.device)[:, None, None, :], float("-inf"))
    return torch.bmm(torch.softmax(scores, dim=-1), values).view(B, H, hd)


@functools.lru_cache(maxsize=8)
def _padding(S: int, lengths: tuple[int, ...], device) -> torch.Tensor:
    """[B, S] True past each length (one per step: every layer of a step has the same)."""
    return torch.arange(S, device=device) >= torch.tensor(lengths, device=device)[:, None]


MIN_KEYS = 16  # the widest CPU vector in floats: softmax rows at least this long sum lane-wise


def key_span(cache_length: int, n: int) -> int:
    """How many cache positions a decode step reads to see n keys: n, padded to MIN_KEYS."""
    return min(cache_length, max(n, MIN_KEYS))


@dataclass
class Segment:
    """One sequence's rows in a ragged batch: rows start..start+length-1 at positions pos.."""

    cache: KVCache
    pos: int
    start: int
    length: int


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.wqkv = nn.Parameter(torch.empty(c.q_dim + 2 * c.kv_dim, c.hidden_size),
                                 requires_grad=False)
        self.wo = nn.Parameter(torch.empty(c.hidden_size, c.q_dim), requires_grad=False)
        self.bqkv = nn.Parameter(torch.empty(c.q_dim + 2 * c.kv_dim), requires_grad=False) \
            if c.attention_bias else None  # qwen2

    def forward(self, x, layer: int, cache: KVCache | list[Segment], pos: int, cos, sin, mask):
        c, T = self.c, x.shape[0]
        qkv = linear(x, self.wqkv)  # [T, q + 2kv]
        if self.bqkv is not None:
            qkv = qkv + self.bqkv
        q, k, v = qkv.split([c.q_dim, c.kv_dim, c.kv_dim], dim=-1)
        q = apply_rope(q.view(T, c.num_heads, c.head_dim).transpose(0, 1), cos, sin)  # [H, T, hd]
        k = apply_rope(k.view(T, c.num_kv_heads, c.head_dim).transpose(0, 1), cos, sin)
        v = v.view(T, c.num_kv_heads, c.head_dim).transpose(0, 1)
        if isinstance(cache, KVCache):
            out = self.attend(cache, layer, pos, q, k, v, mask)
        else:  # ragged batch: projections once over all rows; attention per prompt
            out = self.attend_ragged(cache, layer, q, k, v)  # and decodes at once
        return linear(out.transpose(0, 1).reshape(T, c.q_dim), self.wo)

    @staticmethod
    def attend(cache: KVCache, layer: int, pos: int, q, k, v, mask) -> torch.Tensor:
        T = q.shape[1]
        cache.k[layer, :, pos:pos + T] = k
        cache.v[layer, :, pos:pos + T] = v
        if T == 1:
            n = key_span(cache.length, pos + 1)
            return decode_attention(q.transpose(0, 1), cache.k[layer, None, :, :n],
                                    cache.v[layer, None, :, :n], [pos + 1]).transpose(0, 1)
        keys, values = cache.k[layer, :, :pos + T], cache.v[layer, :, :pos + T]  # [Hkv, S, hd]
        if keys.dtype != q.dtype:
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)

    def attend_ragged(self, segs: list[Segment], layer: int, q, k, v) -> torch.Tensor:
        """Attention of a ragged batch: prompt chunks one by one, and the sequences that decode
        one token together in `decode_attention` (CPU: exact there, see it) -> [H, T, hd]."""
        def alone(s: Segment) -> torch.Tensor:
            return self.attend(s.cache, layer, s.pos, *(t[:, s.start:s.start + s.length]
                                                        for t in (q, k, v)),
                               causal_mask(s.pos, s.length, q.device))

        dec = [s for s in segs if s.length == 1]
        if len(dec) < 2 or q.device.type != "cpu" or len({s.cache.length for s in dec}) > 1:
            return torch.cat([alone(s) for s in segs], dim=1)
        n = max(key_span(s.cache.length, s.pos + 1) for s in dec)
        pool = dec[0].cache.pooled
        slots, pos, rows = _indices(tuple(s.cache.index for s in dec), tuple(s.pos for s in dec),
                                    tuple(s.start for s in dec), q.device)
        if pool is not None and all(s.cache.pooled is pool for s in dec):  # one op, not B
            for buf, new in ((pool.k, k), (pool.v, v)):
                buf[slots, layer, :, pos] = new.index_select(1, rows).transpose(0, 1).to(buf.dtype)

            def read(part: slice) -> tuple[torch.Tensor, torch.Tensor]:
                ids = [s.cache.index for s in dec[part]]
                if ids == list(range(ids[0], ids[0] + len(ids))):  # consecutive: a view
                    return (pool.k[ids[0]:ids[0] + len(ids), layer, :, :n],
                            pool.v[ids[0]:ids[0] + len(ids), layer, :, :n])
                return (pool.k[:, layer, :, :n].index_select(0, slots[part]),
                        pool.v[:, layer, :, :n].index_select(0, slots[part]))
        else:
            for s in dec:
                s.cache.k[layer, :, s.pos] = k[:, s.start]
                s.cache.v[layer, :, s.pos] = v[:, s.start]

            def read(part: slice) -> tuple[torch.Tensor, torch.Tensor]:
                return (torch.stack([s.cache.k[layer, :, :n] for s in dec[part]]),
                        torch.stack([s.cache.v[layer, :, :n] for s in dec[part]]))
        c = self.c  # sequences per call: their float keys/values and scores stay within the
        # planned scores of one default prompt chunk (H x 256 x context floats)
        per = max(1, c.num_heads * 256 * dec[0].cache.length
                  // (n * (3 * c.num_kv_heads * c.head_dim + 2 * c.num_heads)))
        qd = (q if len(dec) == len(segs) else q.index_select(1, rows)).transpose(0, 1)
        lengths = [s.pos + 1 for s in dec]
        o = torch.cat([decode_attention(qd[i:i + per], *read(slice(i, i + per)),
                                        lengths[i:i + per])
                       for i in range(0, len(dec), per)])  # [B, H, hd]
        if len(dec) == len(segs):
            return o.transpose(0, 1)
        done = dict(zip(map(id, dec), o.unsqueeze(2)))  # each [H, 1, hd]
        return torch.cat([done[id(s)] if id(s) in done else alone(s) for s in segs], dim=1)


@functools.lru_cache(maxsize=8)
def _indices(*lists_and_device) -> tuple[torch.Tensor, ...]:
    """The index tensors of a step's decoding sequences (the same for every layer)."""
    *lists, device = lists_and_device
    return tuple(torch.tensor(x, device=device) for x in lists)


class DenseFFN(nn.Module):
    def __init__(self, c: ModelConfig, rows: int | None = None):
        super().__init__()
        rows = c.intermediate_size if rows is None else rows
        self.rows = rows
        self.w_gate_up = nn.Parameter(torch.empty(2 * rows, c.hidden_size), requires_grad=False)
        self.w_down = nn.Parameter(torch.empty(c.hidden_size, rows), requires_grad=False)

    def act(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.w_gate_up)  # [T, F]

    def forward(self, x, layer: int, hook: ActivationHook | None = None):
        h = self.act(x)
        if hook is not None:
            hook(layer, h)
        return linear(h, self.w_down)


def swiglu(x: torch.Tensor, gate_up: Weight) -> torch.Tensor:
    g, u = linear(x, gate_up).chunk(2, dim=-1)
    return F.silu(g) * u  # [T, rows]


def expert_ffn(x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    return linear(swiglu(x, w.gate_up), w.down)  # [T_e, D]


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
        rows: dict[int, list[int]] = {}
        for t, e in enumerate(route.tolist()):
            rows.setdefault(e, []).append(t)
        groups = [e for e in (order if order is not None else sorted(rows)) if e in rows]
        # the rows sorted by expert, once: each group is then a slice, and one gather puts
        # every group's output back in row order (the same sums as an index_add_ per group;
        # index_add_ itself cost 0.35 ms a call with 2 threads on a busy machine)
        perm = [t for e in groups for t in rows[e]]
        inv = [0] * len(perm)
        for i, t in enumerate(perm):
            inv[t] = i
        xs, ys, at = x.index_select(0, torch.tensor(perm, device=x.device)), [], 0
        for e in groups:
            with self.experts.get(layer, e) as w:
                ys.append(expert_ffn(xs[at:at + len(rows[e])], w))  # [T_e, D]
            at += len(rows[e])
        return out.add_(torch.cat(ys).index_select(0, torch.tensor(inv, device=x.device)))


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

    def weight_bytes(self) -> int:
        """Bytes of every weight and buffer, quantized ones included."""
        total = sum(p.nbytes for p in self.parameters()) + sum(b.nbytes for b in self.buffers())
        return total + sum(nbytes(v) for m in self.modules() for v in vars(m).values()
                           if hasattr(v, "dequantize"))

    def attach_experts(self, provider: ExpertProvider) -> None:
        for block in self.layers:
            if isinstance(block.ffn, MoEFFN):
                block.ffn.experts = provider

    def forward(self, tokens: torch.Tensor, cache: KVCache | list[Segment], pos: int,
                route: torch.Tensor | None = None, order: list[list[int]] | None = None,
                hook: ActivationHook | None = None, all_logits: bool = False,
                after_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """tokens: [T] at positions pos..pos+T-1. route: [T, L] expert per token per layer (MoE).
        order: per layer, the order in which to run expert groups. Returns logits [T or 1, V].
        With a list of Segments (ragged batch, pos unused): logits of each segment's last row."""
        T = tokens.shape[0]
        x = embedding(tokens, self.embed, self.norm.dtype)  # [T, D]
        if isinstance(cache, KVCache):
            cos, sin = self.cos[pos:pos + T], self.sin[pos:pos + T]
            mask, last = causal_mask(pos, T, x.device), [T - 1]
        else:  # ragged batch (list of Segment): each sequence at its own positions
            at = torch.cat([torch.arange(s.pos, s.pos + s.length) for s in cache]).to(x.device)
            cos, sin, mask = self.cos[at], self.sin[at], None  # [T, hd]
            last = [s.start + s.length - 1 for s in cache]
        for i, block in enumerate(self.layers):
            r = None if route is None else route[:, i]
            x = block(x, cache, pos, cos, sin, mask, r, None if order is None else order[i], hook)
            if after_layer is not None:
                after_layer(i)
        if not all_logits:
            x = x[last]  # [1 or segments, D]
        x = F.rms_norm(x, x.shape[-1:], self.norm, self.c.rms_eps)
        return linear(x, self.embed if self.lm_head is None else self.lm_head)


# weights that `convert` may quantize, and the role each plays
PROJECTIONS = ("wqkv", "wo", "w_gate_up", "w_down", "lm_head")


def _assign(mod: nn.Module, name: str, w: Weight) -> None:
    if isinstance(w, torch.Tensor):
        setattr(mod, name, nn.Parameter(w, requires_grad=False))
    else:
        mod._parameters.pop(name, None)
        setattr(mod, name, w)


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    """[r, D] -> [rows, D] with zero rows (zero neurons: silu(0) * 0 = 0, exact), so quantized
    kernels' blocks fit."""
    return w if w.shape[0] == rows else torch.cat([w, w.new_zeros(rows - w.shape[0], w.shape[1])])


def padded_rows(rows: int, weights: str | None) -> int:
    return rows if weights in (None, "f32", "bf16", "f16") else -(-rows // 32) * 32


def weight_specs(c: ModelConfig, tensors: dict[str, torch.Tensor], weights: str | None):
    """(module path, attribute, tensor maker, role) for every weight, in build order; the
    memory plan walks the same list, so planned and built bytes agree."""
    specs = [("", "embed", lambda: row_source(tensors, "model.embed_tokens.weight"), "embed"),
             ("", "norm", lambda: tensors["model.norm.weight"], "norm")]
    if not c.tie_embeddings:
        specs.append(("", "lm_head", lambda: row_source(tensors, "lm_head.weight"), "proj"))
    for i in range(c.num_layers):
        p, b = f"model.layers.{i}.", f"layers.{i}."
        moe = c.moe is not None
        mlp, ffn = (p + "mlp.shared.", b + "ffn.shared") if moe else (p + "mlp.", b + "ffn")

        def gate_up(mlp=mlp):
            rows = padded_rows(shape_of(tensors, mlp + "down_proj.weight")[1], weights)
            return torch.cat([_pad_rows(tensors[mlp + f"{n}_proj.weight"], rows)
                              for n in ("gate", "up")])

        def down(mlp=mlp):
            w = tensors[mlp + "down_proj.weight"]
            return _pad_rows(w.t(), padded_rows(w.shape[1], weights)).t()

        specs += [
            (b[:-1], "attn_norm", lambda p=p: tensors[p + "input_layernorm.weight"], "norm"),
            (b[:-1], "ffn_norm", lambda p=p: tensors[p + "post_attention_layernorm.weight"],
             "norm"),
            (b + "attn", "wqkv", lambda p=p: torch.cat(
                [tensors[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]), "proj"),
            (b + "attn", "wo", lambda p=p: tensors[p + "self_attn.o_proj.weight"], "proj"),
            *([(b + "attn", "bqkv", lambda p=p: torch.cat(
                [tensors[p + f"self_attn.{n}_proj.bias"] for n in "qkv"]), "norm")]
              if c.attention_bias else []),
            (ffn, "w_gate_up", gate_up, "proj"),
            (ffn, "w_down", down, "down"),
        ]
    return specs


def spec_shape(c: ModelConfig, tensors: dict[str, torch.Tensor], path: str, name: str,
               weights: str | None) -> tuple[int, ...]:
    """The shape a spec's tensor will have, without building it."""
    if name in ("embed", "lm_head"):
        return (c.vocab_size, c.hidden_size)
    if name in ("norm", "attn_norm", "ffn_norm"):
        return (c.hidden_size,)
    if name == "bqkv":
        return (c.q_dim + 2 * c.kv_dim,)
    if name == "wqkv":
        return (c.q_dim + 2 * c.kv_dim, c.hidden_size)
    if name == "wo":
        return (c.hidden_size, c.q_dim)
    layer = int(path.split(".")[1])
    pre = f"model.layers.{layer}.mlp." + ("shared." if c.moe is not None else "")
    rows = padded_rows(shape_of(tensors, pre + "down_proj.weight")[1], weights)
    return (2 * rows, c.hidden_size) if name == "w_gate_up" else (c.hidden_size, rows)


def build_transformer(c: ModelConfig, tensors: dict[str, torch.Tensor], device, dtype,
                      rope_length: int | None = None, weights: str | None = None,
                      in_file: Mapping[str, RowFile] | None = None) -> Transformer:
    """Build on the meta device, then assign real tensors (no throwaway random init).

    weights: a format of `edge_readme.quant` (None: plain tensors in `dtype`); each weight is
    converted as it is assigned, so at most one float copy of one tensor is alive at a time.
    in_file: lookup tables left in the model file (see `rowfile`), by tensor name; needs weights."""
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(c, rope_length)
    cos, sin = rope_tables(c.head_dim, rope_length or c.max_position, c.rope_theta, device, dtype)
    in_file = in_file or {}
    for path, name, make, role in weight_specs(c, tensors, weights):
        if name == "embed" and "model.embed_tokens.weight" in in_file and weights is not None:
            _assign(model, name, FileRows(in_file["model.embed_tokens.weight"], weights, device))
            continue
        t = make()
        if weights is None or role == "norm":
            t = t if isinstance(t, torch.Tensor) else torch.cat(list(t.blocks()))
            w = t.to(device=device, dtype=dtype).contiguous()
        else:
            w = convert(t, weights, role, device)
        _assign(model.get_submodule(path) if path else model, name, w)
    model.cos, model.sin = cos, sin
    return model
