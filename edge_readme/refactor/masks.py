"""Read-ME expert masks from activation statistics.

Per group (domain or cluster) keep the top `active_fraction` neurons of each layer; the neurons
every group keeps form the shared expert; expert i is group i's neurons minus the shared ones.
Masks are sorted int64 neuron indices; on disk they are int32 (`layers.{i}.shared`,
`layers.{i}.experts.{e}`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edge_readme.errors import DataError, ModelFormatError


@dataclass
class Masks:
    shared: list[torch.Tensor]  # per layer: [rows_shared]
    experts: list[list[torch.Tensor]]  # per layer, per expert: [rows_e]

    @property
    def num_layers(self) -> int:
        return len(self.shared)

    @property
    def num_experts(self) -> int:
        return len(self.experts[0])

    def expert_membership(self, ffn: int) -> torch.Tensor:
        """[L, F, E] float: 1 where neuron f belongs to expert e's own (non-shared) set."""
        m = torch.zeros(self.num_layers, ffn, self.num_experts)
        for i, per in enumerate(self.experts):
            for e, idx in enumerate(per):
                m[i, idx, e] = 1.0
        return m

    def active_rows(self) -> float:
        """Mean over layers and experts of shared + expert rows (what one token runs)."""
        n = [len(s) + len(x) for s, per in zip(self.shared, self.experts) for x in per]
        return sum(n) / len(n)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, (s, per) in enumerate(zip(self.shared, self.experts)):
            out[f"layers.{i}.shared"] = s.to(torch.int32)
            for e, idx in enumerate(per):
                out[f"layers.{i}.experts.{e}"] = idx.to(torch.int32)
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], num_layers: int, num_experts: int,
                     source: str = "masks.safetensors") -> "Masks":
        try:
            shared = [t[f"layers.{i}.shared"].long() for i in range(num_layers)]
            experts = [[t[f"layers.{i}.experts.{e}"].long() for e in range(num_experts)]
                       for i in range(num_layers)]
        except KeyError as e:
            raise ModelFormatError(f"{source}: missing tensor {e.args[0]!r}; expected masks for "
                                   f"{num_layers} layers x {num_experts} experts") from None
        return cls(shared, experts)


def check_fraction(active_fraction: float) -> None:
    if not (isinstance(active_fraction, (int, float)) and 0 < active_fraction <= 1):
        raise DataError(f"active fraction is {active_fraction!r}; expected a number in (0, 1], "
                        "e.g. 0.5 keeps half of each FFN per token")


def build_masks(stats: torch.Tensor, active_fraction: float,
                rows: list[int] | None = None) -> Masks:
    """stats: [G, L, F] mean |act| -> shared and per-group expert masks.

    Each group keeps its top `active_fraction` of every layer's neurons, or `rows[i]` neurons of
    layer i when given (a per-layer allocation, see allocate.py)."""
    check_fraction(active_fraction)
    G, L, F = stats.shape
    keep = rows if rows is not None else [max(1, round(active_fraction * F))] * L
    chosen = torch.zeros(G, L, F, dtype=torch.bool)
    for i in range(L):
        chosen[:, i].scatter_(1, stats[:, i].topk(keep[i], dim=-1).indices, True)
    common = chosen.all(dim=0)  # [L, F]
    shared, experts = [], []
    for i in range(L):
        shared.append(common[i].nonzero().squeeze(1))
        per = []
        for g in range(G):
            own = (chosen[g, i] & ~common[i]).nonzero().squeeze(1)
            if own.numel() == 0:  # all kept neurons are shared: one placeholder row, see
                own = stats[g, i].argmax().reshape(1)  # slice_layer (its down is zeroed)
            per.append(own)
        experts.append(per)
    return Masks(shared, experts)
