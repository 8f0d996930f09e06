"""Int4 group-wise weights (group size 32) for torch's int4 matmul kernels.

Values follow GGUF's Q4_1 rule, `w = scale * q + min` with q in 0..15 per group of 32 along the
input dimension. Torch's kernels compute `(q - 8) * scale + zero`, so `zero = min + 8 * scale`.
A Q4_0 or Q4_1 (and Q4_K) matrix lies exactly on such a grid: `quantize` recovers that grid from
the dequantized float values instead of fitting a new one, so a GGUF's 4-bit values are kept, not
requantized. Other tensors get the plain min/max fit.

Packed layout (CPU kernel, and our files): uint8 [N / 64, K, 32] where byte (b, k, j) holds row
b*64 + j in its low nibble and row b*64 + 32 + j in its high nibble, column k. Scales and zeros:
[K / 32, N, 2] in the activation dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

GROUP = 32
ROW_BLOCK = 64  # the packed layout interleaves rows in blocks of 64


def eligible(shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and shape[0] % ROW_BLOCK == 0 and shape[1] % GROUP == 0


CHUNK_BYTES = 512 << 10  # float bytes quantized at a time: the fit's temporaries stay below
# the 1 MiB mmap threshold the loader sets (memory.bounded_heap), so they reuse heap memory


def row_chunks(w, multiple: int = 16) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, float32 rows) of a [N, K] matrix or row source, about CHUNK_BYTES at a time,
    in a multiple of `multiple` rows (the source's blocks must be multiples of it too)."""
    r = 0
    for block in [w] if isinstance(w, torch.Tensor) else w.blocks():
        n = max(multiple, CHUNK_BYTES // (4 * block.shape[1]) // multiple * multiple)
        for rows in block.detach().split(n):
            yield r, rows.float()
            r += rows.shape[0]


def _grid_fit(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w: [N, G, 32] float32 -> (q uint8 0..15, scale [N, G], min [N, G]).

    Groups whose values lie on an evenly spaced grid of at most 16 levels (a dequantized 4-bit
    group) get that grid back exactly; the others get the min/max range, shrunk at either end
    where that lowers the group's squared error (`_mse_fit`)."""
    lo, hi = w.amin(-1), w.amax(-1)
    span = hi - lo
    best = span / 15
    fitted = span <= 0
    for steps in range(15, 0, -1):  # the widest grid first: most Q4 groups use all 16 levels
        todo = ~fitted
        if not todo.any() or (steps <= 12 and fitted.float().mean() < 0.05):
            break  # not a 4-bit tensor: no use trying narrower grids
        s = span[todo] / steps
        r = (w[todo] - lo[todo][:, None]) / s[:, None]
        ok = (r - r.round()).abs().amax(-1) < 1e-3
        idx = tuple(i[ok] for i in todo.nonzero(as_tuple=True))
        best[idx] = s[ok]
        fitted[idx] = True
    scale = torch.where(span > 0, best, torch.zeros_like(best))
    if (~fitted).any():
        rest = (~fitted).nonzero(as_tuple=True)
        scale[rest], lo[rest] = _mse_fit(w[rest], lo[rest], hi[rest])
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = ((w - lo[..., None]) * inv[..., None]).round().clamp(0, 15).to(torch.uint8)
    return q, scale, lo


def on_grid(w: torch.Tensor, rows: int = 64) -> bool:
    """Whether a [N, K] matrix holds a 4-bit model's values (checked on its first rows): most
    groups of 32 lie exactly on 16 evenly spaced levels."""
    if w.dim() != 2 or w.shape[1] % GROUP:
        return False
    g = w[:rows].detach().float().reshape(-1, GROUP)
    lo, span = g.amin(-1), g.amax(-1) - g.amin(-1)
    g, lo, span = g[span > 0], lo[span > 0], span[span > 0]
    fitted = torch.zeros_like(span, dtype=torch.bool)
    for steps in range(15, 7, -1):  # Q4_1 groups span 15 steps; Q4_0 ones often fewer
        r = (g - lo[:, None]) / (span / steps)[:, None]
        fitted |= (r - r.round()).abs().amax(-1) < 1e-3
    return bool(span.numel()) and float(fitted.float().mean()) > 0.9


SHRINK = (0.0, 0.04, 0.08, 0.12, 0.16, 0.2)


def _mse_fit(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [M, 32], per-group range -> (scale, min) of the least squared error among ranges shrunk
    by SHRINK at each end (outliers get clipped when that serves the other 31 values better)."""
    span = hi - lo
    best_err = torch.full_like(lo, float("inf"))
    best_s, best_lo = span / 15, lo.clone()
    for a in SHRINK:
        for b in SHRINK:
            lo_c = lo + a * span
            s = (span * (1 - a - b) / 15).clamp(min=1e-30)
            q = ((w - lo_c[:, None]) / s[:, None]).round().clamp(0, 15)
            err = ((q * s[:, None] + lo_c[:, None]) - w).pow(2).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            best_lo = torch.where(better, lo_c, best_lo)
    return best_s, best_lo


def pack(q: torch.Tensor) -> torch.Tensor:
    """q: [N, K] integers 0..15 -> packed uint8 [N, K / 2] in the CPU kernel's layout."""
    N, K = q.shape
    b = q.to(torch.uint8).view(N // ROW_BLOCK, 2, 32, K).permute(0, 3, 1, 2)  # [nb, K, 2, 32]
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(N, K // 2).contiguous()


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack: uint8 [N, K / 2] -> uint8 [N, K] values 0..15."""
    N, half = packed.shape
    K = half * 2
    b = packed.view(N // ROW_BLOCK, K, 32)
    both = torch.stack([b & 15, b >> 4], dim=2)  # [nb, K, 2, 32]
    return both.permute(0, 2, 3, 1).reshape(N, K)


def fit16(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] float -> (q [N, K] 0..15, scale [N, G] fp16, min [N, G] fp16), grid kept exactly
    where the values lie on a float16-representable 4-bit grid (a GGUF Q4_0/Q4_1 group)."""
    N, K = w.shape
    g = w.float().reshape(N, K // GROUP, GROUP)
    q, scale, lo = _grid_fit(g)
    s16 = scale.half()
    qmax = q.amax(-1).int()
    m16, shift = lo.half(), torch.zeros_like(qmax)
    found = torch.zeros_like(qmax, dtype=torch.bool)
    for j in range(16):  # the file's min may sit j steps below the group's smallest value
        cand = lo - j * s16.float()
        ok = ~found & (j + qmax <= 15) & ((cand.half().float() - cand).abs()
                                          <= 1e-6 * cand.abs().clamp(min=1e-30))
        m16 = torch.where(ok, cand.half(), m16)
        shift = torch.where(ok, torch.full_like(shift, j), shift)
        found |= ok
    q = (q.int() + shift[..., None]).clamp(0, 15).to(torch.uint8)
    return q.view(N, K), s16, m16


def encode_plain(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """A float [N, K] weight -> {'q4': uint8 [N, K/2] (low nibble: even column), 'q4_scale',
    'q4_min': float16 [N, K/32]}: how a model folder stores a 4-bit matrix."""
    q, s, m = fit16(w)
    q = q.view(w.shape[0], -1, 2)
    return {"q4": (q[..., 0] | (q[..., 1] << 4)).contiguous(), "q4_scale": s.contiguous(),
            "q4_min": m.contiguous()}


def decode_plain(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """Inverse of encode_plain, in float32: w = scale * q + min (GGUF's Q4_1 arithmetic)."""
    N = q.shape[0]
    vals = torch.stack([q & 15, q >> 4], dim=-1).view(N, -1, GROUP).float()
    return (vals * scale.float()[..., None] + lo.float()[..., None]).view(N, -1)


@dataclass
class Q4Weight:
    """A [N, K] weight as packed int4 plus per-group scale and zero (kernel-ready)."""

    packed: torch.Tensor  # uint8 [N, K/2] (CPU) or int32 tiles (CUDA)
    scale_zero: torch.Tensor  # [K/32, N, 2] in the activation dtype
    shape: tuple[int, int]

    @classmethod
    def quantize(cls, w, dtype: torch.dtype = torch.float32) -> Q4Weight:
        """w: a [N, K] float matrix, or a row source (`loader.Rows`: a big table read a block
        at a time, never whole in float32)."""
        N, K = w.shape
        packed = torch.empty(N, K // 2, dtype=torch.uint8)
        scale, lo = torch.empty(N, K // GROUP), torch.empty(N, K // GROUP)
        # by row blocks of 64 (the packed layout's unit, so packing a block at a time equals
        # packing the whole): the fit's temporaries stay small, and the outputs are allocated
        # once (no pieces left between them in the heap, no unpacked copy of the matrix)
        for r, rows in row_chunks(w, ROW_BLOCK):
            n = rows.shape[0]
            q, scale[r:r + n], lo[r:r + n] = (
                x.reshape(n, -1) for x in _grid_fit(rows.reshape(n, -1, GROUP)))
            packed[r:r + n] = pack(q)
        return cls.from_parts(packed, scale, lo, dtype)

    @classmethod
    def from_parts(cls, packed: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> Q4Weight:
        """packed [N, K/2]; scale, lo: [N, K/32] (any float dtype)."""
        N = packed.shape[0]
        sz = scale_zero(scale, lo, dtype)
        return cls(packed, sz, (N, packed.shape[1] * 2))

    def dequantize(self) -> torch.Tensor:
        N, K = self.shape
        q = unpack(self.packed).float().view(N, K // GROUP, GROUP)
        sz = self.scale_zero.float()  # [G, N, 2]
        scale, zero = sz[..., 0].t(), sz[..., 1].t()  # [N, G]
        return ((q - 8) * scale[..., None] + zero[..., None]).view(N, K)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scale_zero.nbytes

    def to(self, device: torch.device) -> Q4Weight:
        if device.type == "cpu":
            return self
        if device.type != "cuda":
            raise ValueError(f"int4 weights run on cpu or cuda, not {device.type}")
        return Q4Weight(cuda_pack(self.packed.to(device)), self.scale_zero.to(device,
                        torch.bfloat16), self.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] in any float dtype -> [..., N] in x's dtype (the kernel runs in the
        scales' dtype)."""
        x2 = x.reshape(-1, x.shape[-1]).to(self.scale_zero.dtype)
        if x2.is_cuda:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, GROUP, self.scale_zero)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, GROUP,
                                                           self.scale_zero)
        return y.to(x.dtype).view(*x.shape[:-1], self.shape[0])


def scale_zero(scale: torch.Tensor, lo: torch.Tensor, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """[N, G] scale and min -> [G, N, 2] (scale, min + 8 scale) for the kernels."""
    s, m = scale.float(), lo.float()
    if out is None:
        out = torch.empty(s.shape[1], s.shape[0], 2, dtype=dtype)
    out[..., 0].copy_(s.t())
    out[..., 1].copy_((m + 8 * s).t())
    return out


def cuda_pack(packed: torch.Tensor) -> torch.Tensor:
    """Our packed layout -> the CUDA kernel's int32 tiles (sm80+)."""
    q = unpack(packed).to(torch.int32)
    return torch.ops.aten._convert_weight_to_int4pack(q, 8)
