"""Low-rank trained corrections (LoRA-style) to the experts, small enough to ship.

Full-weight distillation changes every expert weight, which makes its result as big as the experts
themselves (hundreds of MB): it cannot ship as a pull-time artifact. Here each weight W [rows, D]
of the shared expert and of every routed expert (gate, up and the transposed down projection) gets
a trainable correction B @ A (B [rows, r], A [r, D]); the distillation trains only A and B, and
the build adds B @ A to the float weights before anything is written (so a quantized expert
format downstream sees merged float weights).

Stored as safetensors, float16, one pair per weight:
    layers.{i}.shared.{gate|up|down}.{a|b}
    layers.{i}.experts.{e}.{gate|up|down}.{a|b}
"""

from __future__ import annotations

from pathlib import Path

import torch

from edge_readme.errors import ModelFormatError

from . import functional as fn

PROJ = ("gate", "up", "down")
FOLDER_DELTAS = "deltas.safetensors"  # in a refactored folder: the factors + refit_router.*


def _parts(layers: list[fn.MoELayer]):
    """(name prefix, layer index, expert index or None, weight triple) for every expert."""
    for i, layer in enumerate(layers):
        yield f"layers.{i}.shared", i, None, layer.shared
        for e, ex in enumerate(layer.experts):
            yield f"layers.{i}.experts.{e}", i, e, ex


class Deltas:
    """One (A, B) pair per expert weight; `apply` gives effective layers W + B @ A."""

    def __init__(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int):
        self.factors = factors  # "layers.{i}.shared.gate" -> (a [r, D], b [rows, r])
        self.rank = rank

    @classmethod
    def create(cls, layers: list[fn.MoELayer], rank: int, seed: int = 0) -> "Deltas":
        """A ~ N(0, 1/D), B = 0 (LoRA's start): the corrections start at exactly zero."""
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"delta rank is {rank!r}; expected an integer >= 1")
        gen = torch.Generator().manual_seed(seed)
        factors = {}
        for prefix, _, _, ws in _parts(layers):
            for name, w in zip(PROJ, ws):
                rows, d = w.shape
                a = torch.randn(rank, d, generator=gen) / d ** 0.5
                factors[f"{prefix}.{name}"] = (a, torch.zeros(rows, rank))
        return cls(factors, rank)

    def parameters(self) -> list[torch.Tensor]:
        return [t for pair in self.factors.values() for t in pair]

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.parameters())

    def _delta(self, key: str, w: torch.Tensor) -> torch.Tensor:
        a, b = self.factors[key]
        if b.shape[0] == 0:
            return torch.zeros_like(w)
        return (b @ a).to(w.dtype)

    def apply(self, layers: list[fn.MoELayer]) -> list[fn.MoELayer]:
        """New layers with W + B @ A (differentiable in A and B; `layers` are left alone)."""
        out: list[fn.MoELayer] = [fn.MoELayer(layer.shared, list(layer.experts))
                                  for layer in layers]
        for prefix, i, e, ws in _parts(layers):
            new = tuple(w + self._delta(f"{prefix}.{n}", w) for n, w in zip(PROJ, ws))
            if e is None:
                out[i].shared = new  # type: ignore[assignment]
            else:
                out[i].experts[e] = new  # type: ignore[assignment]
        return out

    @torch.no_grad()
    def merge_into(self, layers: list[fn.MoELayer]) -> None:
        """Add B @ A to the float weights in place."""
        for prefix, _, _, ws in _parts(layers):
            for n, w in zip(PROJ, ws):
                w.add_(self._delta(f"{prefix}.{n}", w))

    def to_tensors(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        out = {}
        for key, (a, b) in self.factors.items():
            out[f"{key}.a"] = a.detach().to(dtype).contiguous()
            out[f"{key}.b"] = b.detach().to(dtype).contiguous()
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], layers: list[fn.MoELayer],
                     source: str | Path = "deltas") -> "Deltas":
        """Check every factor against the layers' shapes; a typed error names what is wrong."""
        factors, rank = {}, None
        for prefix, _, _, ws in _parts(layers):
            for n, w in zip(PROJ, ws):
                key = f"{prefix}.{n}"
                if f"{key}.a" not in t or f"{key}.b" not in t:
                    raise ModelFormatError(f"{source}: no tensors {key}.a/{key}.b; the delta file "
                                           "does not match these masks. Rebuild the artifacts")
                a, b = t[f"{key}.a"].float(), t[f"{key}.b"].float()
                rank = a.shape[0] if rank is None else rank
                if a.shape != (rank, w.shape[1]) or b.shape != (w.shape[0], rank):
                    raise ModelFormatError(
                        f"{source}: {key} has factors {tuple(b.shape)} x {tuple(a.shape)}; "
                        f"expected ({w.shape[0]}, {rank}) x ({rank}, {w.shape[1]}) for weight "
                        f"{tuple(w.shape)}. Rebuild the artifacts from the same masks")
                factors[key] = (a, b)
        return cls(factors, rank or 0)


def size_bytes(layers: list[fn.MoELayer], rank: int, bytes_per: int = 2) -> int:
    """What a rank-`rank` delta file for `layers` holds (payload only)."""
    return sum(rank * (w.shape[0] + w.shape[1]) * bytes_per
               for _, _, _, ws in _parts(layers) for w in ws)
