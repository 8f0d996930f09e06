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


def level_codes(act: torch.Tensor) -> torch.Tensor:
    """act: [M, F] -> uint8 [M, F]: in how many of the top-N LEVELS each neuron lies (0..3).

    Thresholds come from one sorted top-k (no full argsort); importance = codes / len(LEVELS).
    """
    a = act.abs()
    F = a.shape[-1]
    ks = [max(1, round(lv * F)) for lv in LEVELS]
    top = a.topk(max(ks), dim=-1).values  # [M, kmax], descending
    codes = torch.zeros(a.shape, dtype=torch.uint8)
    for k in ks:
        codes += a >= top[:, k - 1:k]
    return codes


def importance(act: torch.Tensor) -> torch.Tensor:
    """act: [N, F] -> soft importance [N, F] in [0, 1]: mean of top-N indicators."""
    return level_codes(act).float() / len(LEVELS)


@torch.inference_mode()
def activation_codes(bb: fn.Backbone, seqs: list[list[int]], progress: bool = True,
                     desc: str = "router targets", batch: int = 8) -> torch.Tensor:
    """Level codes of every token's dense activations: uint8 [N, T, L, F], one dense pass."""
    c = bb.config
    N, T = len(seqs), len(seqs[0]) if seqs else 0
    codes = torch.empty(N, T, c.num_layers, c.intermediate_size, dtype=torch.uint8)
    with tqdm(total=N * T, desc=desc, unit="tok", disable=not progress) as bar:
        for i in range(0, N, batch):
            ids = torch.tensor(seqs[i:i + batch], dtype=torch.long)  # [B, T]
            out = codes[i:i + len(ids)]

            def hook(layer, act, out=out):
                out[:, :, layer] = level_codes(act.reshape(-1, act.shape[-1])).view(act.shape)

            fn.dense_forward(bb, ids, hook, head=False)
            bar.update(ids.numel())
    return codes


def scores_from_codes(codes: torch.Tensor, masks: Masks) -> torch.Tensor:
    """codes uint8 [N, T, L, F] -> coverage of each expert [N, T, L, E]."""
    N, T, L, F = codes.shape
    member = masks.expert_membership(F) / len(LEVELS)  # [L, F, E]
    out = torch.empty(N, T, L, member.shape[-1])
    for layer in range(L):
        x = codes[:, :, layer].reshape(-1, F).float()  # [N*T, F]
        out[:, :, layer] = (x @ member[layer]).view(N, T, -1)
    return out


def expert_scores(bb: fn.Backbone, seqs: list[list[int]], masks: Masks,
                  progress: bool = True, desc: str = "router targets") -> torch.Tensor:
    """Coverage of each expert per token and layer: [N, T, L, E] for N sequences of length T."""
    return scores_from_codes(activation_codes(bb, seqs, progress, desc), masks)


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
