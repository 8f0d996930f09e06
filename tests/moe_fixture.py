"""A tiny random expert file for tests: L layers x E experts, hidden D, rows varying per expert."""

from __future__ import annotations

from pathlib import Path

import torch

from edge_readme.experts_format import write_experts

Key = tuple[int, int]


def make_experts(
    layers: int = 3, experts: int = 4, hidden: int = 32, rows: tuple[int, int] = (16, 24),
    dtype: torch.dtype = torch.bfloat16, seed: int = 0,
) -> dict[Key, torch.Tensor]:
    """{(layer, expert): [3, rows, hidden]} with rows drawn from [rows[0], rows[1]]."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(layers):
        for expert in range(experts):
            n = int(torch.randint(rows[0], rows[1] + 1, (1,), generator=gen))
            out[(layer, expert)] = torch.randn(3, n, hidden, generator=gen).to(dtype)
    return out


def write_fixture(
    folder: Path, dtype: torch.dtype = torch.bfloat16, **kwargs
) -> tuple[dict, dict[Key, torch.Tensor]]:
    """Write experts.safetensors + experts.json into folder; return (manifest dict, experts)."""
    experts = make_experts(dtype=dtype, **kwargs)
    return write_experts(folder, experts, dtype), experts
