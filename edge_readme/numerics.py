"""Optional llama.cpp-compatible numerics, for parity checks against the reference peer.

llama.cpp's CPU path quantizes each activation row to 8 bits in blocks of 32 (Q8_0/Q8_1, fp16 scale)
before a dot product with a quantized weight, and keeps its KV cache in fp16. Emulating both brings
our logits closer to the peer's; the default path stays exact fp32/bf16 on the dequantized weights.
"""

from __future__ import annotations

import torch

BLOCK = 32


def q8_round_trip(x: torch.Tensor) -> torch.Tensor:
    """Quantize the last dim to int8 in blocks of 32 with an fp16 scale, and back."""
    shape = x.shape
    xb = x.float().reshape(-1, BLOCK)  # [N, 32]
    d = xb.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xb * inv)
    return (q * d.half().float()).reshape(shape).to(x.dtype)
