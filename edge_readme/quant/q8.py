"""Int8 weights with one scale per output row, for torch's int8 weight-only matmul kernel.

Also the form of the embedding table in the quantized formats: a row lookup scales one int8 row,
and a tied output head runs the same table through the kernel (one copy, not two).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def eligible(shape: tuple[int, ...]) -> bool:
    """The CPU kernel needs the input width in blocks of 32 (else it crashes on batches)."""
    return len(shape) == 2 and shape[1] % 32 == 0


@dataclass
class Q8Weight:
    """A [out, in] weight as int8 rows with one scale per row (weight-only quantization)."""

    q: torch.Tensor  # [out, in] int8
    scale: torch.Tensor  # [out], activation dtype

    @classmethod
    def quantize(cls, w, dtype: torch.dtype = torch.float32) -> Q8Weight:
        """w: a [out, in] float matrix, or a row source (`loader.Rows`)."""
        from .q4 import row_chunks

        q = torch.empty(w.shape, dtype=torch.int8)
        scale = torch.empty(w.shape[0])
        for r, wf in row_chunks(w):  # small temporaries; outputs allocated once
            s = wf.abs().amax(-1).clamp(min=1e-12) / 127.0  # [rows]
            q[r:r + wf.shape[0]] = torch.round(wf / s[:, None]).clamp(-127, 127)
            scale[r:r + wf.shape[0]] = s
        return cls(q, scale.to(dtype))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.float()[:, None]

    def to(self, device: torch.device) -> Q8Weight:
        return Q8Weight(self.q.to(device), self.scale.to(device))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(self.scale.dtype)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.q, self.scale)
        return y.to(x.dtype).view(*x.shape[:-1], -1)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding lookup: [T] ids -> [T, in] in float32."""
        scale = self.scale.index_select(0, ids).float()
        return self.q.index_select(0, ids).float() * scale[:, None]
