"""Read-ME's router target: which expert best covers a token's most active dense neurons.

Per token and layer, the dense |activation| is thresholded at several top-N levels into a soft
importance vector; each expert scores the importance that falls on its own neurons. Scores are
centred and scaled across experts and a softmax turns them into the distillation target; the
argmax is the oracle expert that router accuracy is measured against.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from . import functional as fn
from .masks import Masks

LEVELS = (0.125, 0.25, 0.5)  # top-N levels, as fractions of the FFN width
SHARPNESS = 2.0  # softmax inverse temperature on standardised scores


def importance(act: torch.Tensor) -> torch.Tensor:
    """act: [N, F] -> soft importance [N, F] in [0, 1]: mean of top-N indicators."""
    a = act.abs()
    F = a.shape[-1]
    rank = torch.empty_like(a, dtype=torch.long)
    order = a.argsort(dim=-1, descending=True)
    rank.scatter_(-1, order, torch.arange(F).expand_as(order).contiguous())
    return sum((rank < max(1, round(lv * F))).float() for lv in LEVELS) / len(LEVELS)


@torch.no_grad()
def expert_scores(bb: fn.Backbone, seqs: list[list[int]], masks: Masks,
                  progress: bool = True, desc: str = "router targets") -> torch.Tensor:
    """Coverage of each expert per token and layer: [N, T, L, E] for N sequences of length T."""
    member = masks.expert_membership(bb.config.intermediate_size)  # [L, F, E]
    out = []
    with tqdm(total=sum(map(len, seqs)), desc=desc, unit="tok", disable=not progress) as bar:
        for i in range(0, len(seqs), 4):
            ids = torch.tensor(seqs[i:i + 4], dtype=torch.long)
            per_layer: list[torch.Tensor] = []

            def hook(layer, act, per_layer=per_layer):
                imp = importance(act.reshape(-1, act.shape[-1]))
                per_layer.append((imp @ member[layer]).view(*act.shape[:2], -1))  # [B, T, E]

            fn.dense_forward(bb, ids, hook, head=False)
            out.append(torch.stack(per_layer, dim=2))  # [B, T, L, E]
            bar.update(ids.numel())
    return torch.cat(out)


def soft_target(scores: torch.Tensor, routing: str) -> torch.Tensor:
    """scores [..., L, E] -> target distribution [..., E] (global) or [..., L, E] (per layer)."""
    s = scores.sum(dim=-2) if routing == "global" else scores
    z = (s - s.mean(dim=-1, keepdim=True)) / (s.std(dim=-1, keepdim=True) + 1e-6)
    return torch.softmax(SHARPNESS * z, dim=-1)


def oracle(scores: torch.Tensor, routing: str) -> torch.Tensor:
    """Best-covering expert: [...] (global) or [..., L] (per layer)."""
    return (scores.sum(dim=-2) if routing == "global" else scores).argmax(dim=-1)


def as_path(choice: torch.Tensor, num_layers: int, routing: str) -> torch.Tensor:
    """Global choice [...] or per-layer path [..., L] -> path [..., L]."""
    if routing == "per_layer":
        return choice
    return choice.unsqueeze(-1).expand(*choice.shape, num_layers)
