"""Training-free recovery: a least-squares refit of the down projections, layer by layer.

Walking the layers in order, the MoE model's own FFN inputs (errors of earlier layers included)
meet the target `dense residual after the layer - MoE residual before its FFN`, so each layer also
corrects what the earlier ones missed. The shared expert's and all routed experts' down columns
are solved jointly (one ridge system per layer, pulled toward the sliced dense weights); gate and
up rows stay as sliced.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from . import functional as fn

RIDGE = 1.0  # relative to each neuron's activation energy; held-out ratio at 0.75 (SmolLM2-135M,
# sensitivity allocation): ridge 0.01 1.35, 0.05 1.30, 0.2 1.26, 0.5 1.24, 1.0 1.236, 2.0 1.24
CHUNK = 8  # sequences per forward chunk


@torch.inference_mode()
def _normal_equations(layer: fn.MoELayer, h: torch.Tensor, route: torch.Tensor,
                      y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """G = X^T X and B = X^T Y for X = [shared acts | routed expert's acts]; h, y: [N, D].

    Activations come in the pass dtype; the products accumulate in float32 (the ridge keeps the
    system well conditioned, float64 is kept for the solve only)."""
    g, u, _ = layer.shared
    a_s = fn.swiglu(h, g, u).float()  # [N, rs]
    sizes = [a_s.shape[1]] + [e[0].shape[0] for e in layer.experts]
    off = [0]
    for s in sizes:
        off.append(off[-1] + s)
    G = torch.zeros(off[-1], off[-1])
    B = torch.zeros(off[-1], y.shape[1])
    yf = y.float()
    G[:sizes[0], :sizes[0]] = a_s.T @ a_s
    B[:sizes[0]] = a_s.T @ yf
    for e, (g, u, _) in enumerate(layer.experts):
        idx = (route == e).nonzero().squeeze(1)  # [N_e]
        if idx.numel() == 0:
            continue
        a_e = fn.swiglu(h.index_select(0, idx), g, u).float()  # [N_e, re]
        lo, hi = off[e + 1], off[e + 2]
        cross = a_s.index_select(0, idx).T @ a_e
        G[:sizes[0], lo:hi] = cross
        G[lo:hi, :sizes[0]] = cross.T
        G[lo:hi, lo:hi] = a_e.T @ a_e
        B[lo:hi] = a_e.T @ yf.index_select(0, idx)
    return G.double(), B.double(), off


def solve_layer(layer: fn.MoELayer, G: torch.Tensor, B: torch.Tensor, off: list[int],
                ridge: float = RIDGE) -> None:
    """Ridge toward the current down weights: (G + lam) W = B + lam W0, in place."""
    w0 = torch.cat([layer.shared[2]] + [e[2] for e in layer.experts]).double()  # [K, D]
    diag = G.diagonal()
    lam = ridge * diag + 1e-6 * diag.mean().clamp(min=1e-12)
    A = G + torch.diag(lam)
    w = torch.linalg.solve(A, B + lam[:, None] * w0).float()
    layer.shared[2].copy_(w[off[0]:off[1]])
    for e, ex in enumerate(layer.experts):
        ex[2].copy_(w[off[e + 1]:off[e + 2]])


@torch.inference_mode()
def refit(bb: fn.Backbone, layers: list[fn.MoELayer], seqs: torch.Tensor, route: torch.Tensor,
          ridge: float = RIDGE, progress: bool = True, dtype: torch.dtype | None = None,
          callback=None) -> None:
    """seqs [N, T] calibration ids; route [N, T, L] their experts. Updates `layers` in place.

    The forward passes run in `dtype` (default: `fn.fast_dtype()`, bfloat16 where the CPU has
    fast bfloat16 matmuls); the solved down weights are float32. `callback(fraction)` is called
    after each layer."""
    fb = bb.to(dtype or fn.fast_dtype())
    x_dense = _chunked(lambda ids: fn.embed(fb, ids), seqs)  # [N, T, D]
    x_moe = x_dense.clone()
    N, T, D = x_dense.shape
    for i in tqdm(range(len(layers)), desc="refit", unit="layer", disable=not progress):
        mid_d = _chunked(lambda x: fn.attention_block(fb, i, x), x_dense)
        x_dense = mid_d + _chunked(lambda x: fn.dense_ffn(fb, i, x), mid_d)
        mid_m = _chunked(lambda x: fn.attention_block(fb, i, x), x_moe)
        h = fn.ffn_input(fb, i, mid_m).reshape(N * T, D)
        r = route[..., i].reshape(-1)
        G, B, off = _normal_equations(layers[i].to(fb.dtype), h, r,
                                      (x_dense.float() - mid_m.float()).reshape(N * T, D))
        solve_layer(layers[i], G, B, off, ridge)
        x_moe = mid_m + fn.moe_ffn(layers[i].to(fb.dtype), h, r).view(N, T, D)
        if callback is not None:
            callback((i + 1) / len(layers))


def _chunked(f, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([f(x[i:i + CHUNK]) for i in range(0, len(x), CHUNK)])
