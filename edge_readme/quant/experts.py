"""The q4 form of one routed expert: the bytes `experts.safetensors` stores and a slot holds.

An expert is gate_up [2R, D] and down [D, R] (R neurons, padded with zero neurons to a multiple
of 32). Its blob, at these byte offsets, is:

    gate_up packed int4  [2R, D/2]   uint8 (quant.q4 layout)
    down packed int4     [D, R/2]    uint8
    gate_up scale, min   [D/32, 2R]  float16 each
    down scale, min      [R/32, D]   float16 each

0.625 bytes a weight: 3.2x fewer than float16. A CPU slot keeps the blob as read (one positioned
read, no copy) and expands the float16 scales into the kernel's float32 [G, N, 2] beside it.
Gate and up rows sliced from a GGUF Q4_1 matrix keep their exact float16 scale and min.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import q4

GROUP = q4.GROUP


def padded(rows: int) -> int:
    return -(-rows // GROUP) * GROUP


@dataclass(frozen=True)
class Layout:
    rows: int  # padded neurons R
    hidden: int  # D

    def parts(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        R, D = self.rows, self.hidden
        return [("gu_q", (2 * R, D // 2), torch.uint8), ("dn_q", (D, R // 2), torch.uint8),
                ("gu_s", (D // GROUP, 2 * R), torch.float16),
                ("gu_m", (D // GROUP, 2 * R), torch.float16),
                ("dn_s", (R // GROUP, D), torch.float16), ("dn_m", (R // GROUP, D), torch.float16)]

    @property
    def nbytes(self) -> int:
        return sum(_numel(s) * dt.itemsize for _, s, dt in self.parts())  # 15 R D / 8

    @staticmethod
    def rows_of(nbytes: int, hidden: int) -> int:
        return nbytes * 8 // (15 * hidden)

    def scale_zero_numel(self) -> int:
        """Elements of the kernels' [G, N, 2] scales for both matrices (a CPU slot holds them
        beside the blob, in the kernels' activation dtype)."""
        R, D = self.rows, self.hidden
        return (D // GROUP * 2 * R + R // GROUP * D) * 2

    def views(self, blob: torch.Tensor) -> dict[str, torch.Tensor]:
        out, off = {}, 0
        for name, shape, dt in self.parts():
            n = _numel(shape) * dt.itemsize
            out[name] = blob[off:off + n].view(dt).view(shape)
            off += n
        return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def supported(hidden: int) -> bool:
    return hidden % q4.ROW_BLOCK == 0


def encode(gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """gate_up [2R, D], down [D, R] float (R a multiple of 32) -> the blob, uint8."""
    R, D = down.shape[1], down.shape[0]
    lay = Layout(R, D)
    blob = torch.empty(lay.nbytes, dtype=torch.uint8)
    v = lay.views(blob)
    for pre, w in (("gu", gate_up), ("dn", down)):
        q, s, m = q4.fit16(w)
        v[pre + "_q"].copy_(q4.pack(q))
        v[pre + "_s"].copy_(s.t())
        v[pre + "_m"].copy_(m.t())
    return blob


def scale_zero_into(views: dict[str, torch.Tensor], out: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand the blob's float16 scales and mins into float32 [G, N, 2] kernel tensors that live
    in `out` (the kernels' dtype, scale_zero_numel() elements); returns (gate_up, down)."""
    res, off = [], 0
    for pre in ("gu", "dn"):
        s, m = views[pre + "_s"], views[pre + "_m"]  # [G, N]
        n = s.numel() * 2
        sz = out[off:off + n].view(*s.shape, 2)
        sz[..., 0].copy_(s)
        sz[..., 1].copy_(m.float() + 8 * s.float())
        res.append(sz)
        off += n
    return res[0], res[1]


def weights(views: dict[str, torch.Tensor], sz: tuple[torch.Tensor, torch.Tensor]
            ) -> tuple[q4.Q4Weight, q4.Q4Weight]:
    gu, dn = views["gu_q"], views["dn_q"]
    return (q4.Q4Weight(gu, sz[0], (gu.shape[0], gu.shape[1] * 2)),
            q4.Q4Weight(dn, sz[1], (dn.shape[0], dn.shape[1] * 2)))


def dequantize(views: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> float32 gate_up [2R, D], down [D, R] (any device: unpacking is plain tensor ops)."""
    out = []
    for pre in ("gu", "dn"):
        q = q4.unpack(views[pre + "_q"]).float()  # [N, K]
        N, K = q.shape
        s, m = views[pre + "_s"].float().t(), views[pre + "_m"].float().t()  # [N, G]
        out.append((q.view(N, K // GROUP, GROUP) * s[..., None] + m[..., None]).view(N, K))
    return out[0], out[1]
