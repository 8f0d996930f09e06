"""Optional llama.cpp-compatible numerics, for parity checks against the reference peer.

llama.cpp's CPU path quantizes each activation row to 8 bits in blocks of 32 before a dot product
with a quantized weight. For a Q4_1 weight (w = d*q + m) the activation block is Q8_1: int8 values,
an fp16 scale d_x and an fp16 sum s_x = fp16(d_x * sum(q_x)), so the dot is
    sum_b  d_w * d_x * sum(q_w * q_x)  +  m_w * s_x.
Rounding s_x on its own (not as fp16(d_x) * sum(q_x)) matters: the m_w and d_w terms nearly cancel.
`ggml_linear` reproduces that dot to float32 rounding (measured: 3e-7 relative on every projection
of a layer, given the same input). Q8_0 weights (no mins) take the plain Q8_0 activation round trip.

The default path stays exact float32/bfloat16 on the dequantized weights; this module knows nothing
of files: the caller says which weights were Q4_1 (`attach_q4_1_mins`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

BLOCK = 32


def _q8_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q [N, K/32, 32] as float, d fp32 [N, K/32, 1], fp16-rounded d)."""
    xb = x.float().reshape(-1, x.shape[-1] // BLOCK, BLOCK)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))  # ggml: id = 127 / amax
    q = torch.round(xb * inv)  # round half to even, as _mm256_round_ps(_MM_ROUND_NEAREST)
    d = amax / 127.0
    return q, d, d.half().float()


def q8_round_trip(x: torch.Tensor) -> torch.Tensor:
    """Quantize the last dim to int8 in blocks of 32 with an fp16 scale, and back (Q8_0)."""
    q, _, d16 = _q8_blocks(x)
    return (q * d16).reshape(x.shape).to(x.dtype)


def ggml_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) as llama.cpp computes it with Q8 activations.

    If `w` carries `ggml_mins` ([out, in/32], its Q4_1 block minimums) the Q8_1 sum term is rounded
    as ggml rounds it; otherwise the weight is treated as Q8_0/Q4_0 (no sum term)."""
    q, d, d16 = _q8_blocks(x)
    y = F.linear((q * d16).reshape(x.shape).to(w.dtype), w)
    mins = getattr(w, "ggml_mins", None)
    if mins is not None:
        qs = q.sum(-1, keepdim=True)
        fix = ((d * qs).half().float() - d16 * qs).squeeze(-1)  # [N, in/32]: s_x error in our form
        y = y + F.linear(fix.reshape(*x.shape[:-1], -1).to(w.dtype), mins)
    return y


def q4_1_block_mins(w: torch.Tensor) -> torch.Tensor:
    """Block minimums [out, in/32] of a dequantized Q4_1 weight: every Q4_1 block holds a q == 0,
    so its min is exactly the stored m."""
    return w.reshape(w.shape[0], -1, BLOCK).amin(-1).contiguous()


def attach_q4_1_mins(model: torch.nn.Module, names: set[str] | None = None) -> int:
    """Mark the model's projection weights as Q4_1 for `ggml_linear`. `names` limits it to those
    parameter names (e.g. `layers.0.attn.wqkv`); None marks every 2-D layer weight. Returns a count."""
    n = 0
    for name, p in model.named_parameters():
        if p.dim() != 2 or not name.startswith("layers.") or (names is not None and name not in names):
            continue
        p.ggml_mins = q4_1_block_mins(p.detach())
        n += 1
    return n


def ggml_rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [length, head_dim] (rotate-half layout) with ggml's float32 angles: theta_i is built
    by repeated multiplication with theta_scale = base^(-2/head_dim), not by a power per pair."""
    scale = np.float32(theta) ** np.float32(-2.0 / head_dim)
    ang = np.empty((length, head_dim // 2), np.float32)
    ang[:, 0] = np.arange(length, dtype=np.float32)
    for i in range(1, head_dim // 2):
        ang[:, i] = ang[:, i - 1] * scale  # float32 products, as ggml's loop
    a = torch.from_numpy(ang)
    cos, sin = torch.cos(a), torch.sin(a)
    return torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)


def use_llamacpp_numerics(model: torch.nn.Module, q4_1: bool = True) -> None:
    """Switch a Transformer to llama.cpp-compatible numerics: Q8 activations (with Q4_1 sum rounding
    when `q4_1`) and ggml's RoPE angles. Use an fp16 KVCache alongside, as llama.cpp does."""
    if q4_1:
        attach_q4_1_mins(model)
    cos, sin = ggml_rope_tables(model.c.head_dim, model.cos.shape[0], model.c.rope_theta)
    model.cos.copy_(cos.to(model.cos.dtype))
    model.sin.copy_(sin.to(model.sin.dtype))
    model.set_act_quant(True)
