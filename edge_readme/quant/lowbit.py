"""Low-bit (q2, q3, q4) group-wise copies of routed experts, for `--miss-precision`.

A matrix [N, K] (N a multiple of 64) is fitted per group of `group` inputs to `w = s * q + m`,
q in 0..2^bits-1, with float16 s and m (the least squared error over a few clipped ranges). The
codes are held in bit planes that turn back into the int4 kernel's packed bytes (`q4.pack`,
uint8 [N * K / 2]) with a few whole-tensor shifts and masks, so a miss computes on torch's int4
kernel at the copy's precision and never builds a float weight on the CPU:

- q4: the packed int4 bytes themselves (nibbles 0..15).
- q2: packed bytes P (each nibble 0..3, bits 0x33) split in halves A, B; held as A | B << 2.
- q3: the low two bits of P as q2 holds them, then the high bit (0x11 after >> 2) of four
  quarters of P, one per bit of a byte: L / 2 + L / 4 bytes for L packed bytes.

Group: 32 for q4; 64 for q2/q3 where K allows (their float16 scales would otherwise cost a
third of the bytes), else 32. Bytes a weight, with scales: q2 0.31, q3 0.44, q4 0.63.
This module is pure math: it reads no file and knows nothing of caches or the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edge_readme.errors import EdgeReadmeError

from . import q4

BITS = {"q2": 2, "q3": 3, "q4": 4}
MISS_PRECISIONS = tuple(BITS)
SHRINK = (0.0, 0.05, 0.1, 0.2)  # share of the range clipped at either end, tried per group


def parse_miss_precision(name: str | None) -> str | None:
    """None (off) or one of q2, q3, q4; anything else is a typed error naming the flag."""
    if name is None:
        return None
    if name not in BITS:
        raise EdgeReadmeError(f"--miss-precision: unknown value {name!r}; use one of "
                              f"{', '.join(MISS_PRECISIONS)} (or leave it off for exact output)")
    return name


def group_for(bits: int, K: int) -> int:
    return 64 if bits < 4 and K % 64 == 0 else q4.GROUP


def packed_bytes(bits: int, N: int, K: int) -> int:
    """Bytes of the code planes of an [N, K] matrix."""
    L = N * K // 2
    return L if bits == 4 else L // 2 if bits == 2 else L // 2 + L // 4


def matrix_nbytes(bits: int, N: int, K: int) -> int:
    """Bytes held for an [N, K] matrix: code planes plus float16 scale and min per group."""
    return packed_bytes(bits, N, K) + 2 * N * (K // group_for(bits, K)) * 2


def fit(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor,
                                                           torch.Tensor]:
    """[N, K] float -> (q uint8 [N, K], scale float16 [N, G], min float16 [N, G])."""
    N, K = w.shape
    top = (1 << bits) - 1
    g = w.float().reshape(N, K // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    span = hi - lo
    best_err = torch.full_like(lo, float("inf"))
    best_s, best_m = torch.zeros_like(lo), lo.clone()
    for a in SHRINK:
        for b in SHRINK:
            s = (span * (1 - a - b) / top).half().float()  # fit against the stored scales
            m = (lo + a * span).half().float()
            inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
            q = ((g - m[..., None]) * inv[..., None]).round().clamp(0, top)
            err = (q * s[..., None] + m[..., None] - g).pow(2).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            best_m = torch.where(better, m, best_m)
    inv = torch.where(best_s > 0, 1.0 / best_s, torch.zeros_like(best_s))
    q = ((g - best_m[..., None]) * inv[..., None]).round().clamp(0, top).to(torch.uint8)
    return q.view(N, K), best_s.half(), best_m.half()


def to_planes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int4-packed bytes (flat uint8, nibbles < 2^bits) -> the held code planes."""
    P = packed.reshape(-1)
    L = P.numel()
    if bits == 4:
        return P.clone()
    low = P & 0x33
    two = low[: L // 2] | (low[L // 2:] << 2)
    if bits == 2:
        return two
    hi = (P >> 2) & 0x11
    q = L // 4
    one = hi[:q] | (hi[q:2 * q] << 1) | (hi[2 * q:3 * q] << 2) | (hi[3 * q:] << 3)
    return torch.cat([two, one])


def planes_into(planes: torch.Tensor, bits: int, out: torch.Tensor, tmp: torch.Tensor) -> None:
    """Inverse of to_planes into out (uint8 [L]); tmp: uint8 scratch of at least L / 4."""
    L = out.numel()
    if bits == 4:
        out.copy_(planes)
        return
    h = L // 2
    two = planes[:h]
    torch.bitwise_and(two, 0x33, out=out[:h])
    torch.bitwise_right_shift(two, 2, out=out[h:])
    out[h:].bitwise_and_(0x33)
    if bits == 2:
        return
    q = L // 4
    one, t = planes[h:h + q], tmp[:q]
    for i in range(4):
        torch.bitwise_right_shift(one, i, out=t)
        t.bitwise_and_(0x11)
        t.bitwise_left_shift_(2)
        out[i * q:(i + 1) * q].bitwise_or_(t)


@dataclass
class LowBitMatrix:
    """One [N, K] matrix at `bits` bits: code planes and float16 [N, G] scale and min."""

    planes: torch.Tensor
    scale: torch.Tensor
    lo: torch.Tensor
    shape: tuple[int, int]
    bits: int
    group: int

    @classmethod
    def encode(cls, w: torch.Tensor, bits: int) -> LowBitMatrix:
        N, K = w.shape
        if N % q4.ROW_BLOCK or K % q4.GROUP:
            raise ValueError(f"low-bit matrix: shape {tuple(w.shape)} is not a multiple of "
                             f"({q4.ROW_BLOCK}, {q4.GROUP})")
        group = group_for(bits, K)
        q, s, m = fit(w, bits, group)
        return cls(to_planes(q4.pack(q), bits), s.contiguous(), m.contiguous(), (N, K), bits,
                   group)

    @property
    def nbytes(self) -> int:
        return self.planes.nbytes + self.scale.nbytes + self.lo.nbytes

    def to(self, device: torch.device) -> LowBitMatrix:
        return LowBitMatrix(self.planes.to(device), self.scale.to(device), self.lo.to(device),
                            self.shape, self.bits, self.group)

    def kernel_into(self, packed: torch.Tensor, sz: torch.Tensor, tmp: torch.Tensor
                    ) -> q4.Q4Weight:
        """The CPU int4 kernel's form, built in the caller's buffers: packed uint8 [>= N K / 2],
        sz [>= G * N * 2] in the kernel's dtype, tmp uint8 [>= N K / 8]."""
        N, K = self.shape
        out = packed[: N * K // 2]
        planes_into(self.planes, self.bits, out, tmp)
        G = K // self.group
        sz = sz[: G * N * 2].view(G, N, 2)
        q4.scale_zero(self.scale, self.lo, sz.dtype, out=sz)
        return _Grouped(out.view(N, K // 2), sz, (N, K), self.group)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K] (tests, and devices without the CPU kernel)."""
        N, K = self.shape
        L = N * K // 2
        out = torch.empty(L, dtype=torch.uint8, device=self.planes.device)
        tmp = torch.empty(max(1, L // 4), dtype=torch.uint8, device=self.planes.device)
        planes_into(self.planes, self.bits, out, tmp)
        q = q4.unpack(out.view(N, K // 2)).float().view(N, K // self.group, self.group)
        return (q * self.scale.float()[..., None] + self.lo.float()[..., None]).view(N, K)


@dataclass
class _Grouped(q4.Q4Weight):
    """A Q4Weight whose group size may be 64 (q2/q3 copies)."""

    group: int = q4.GROUP

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(self.scale_zero.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group,
                                                       self.scale_zero)
        return y.to(x.dtype).view(*x.shape[:-1], self.shape[0])

    def dequantize(self) -> torch.Tensor:
        N, K = self.shape
        q = q4.unpack(self.packed).float().view(N, K // self.group, self.group)
        sz = self.scale_zero.float()
        return ((q - 8) * sz[..., 0].t()[..., None] + sz[..., 1].t()[..., None]).view(N, K)


__all__ = ["BITS", "MISS_PRECISIONS", "LowBitMatrix", "fit", "group_for", "matrix_nbytes",
           "packed_bytes", "parse_miss_precision", "planes_into", "to_planes"]
