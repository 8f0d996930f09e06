"""Quality of a refactored MoE folder against its dense reference, through the runtime's model.

Per domain held-out perplexity of the MoE (routed by its own router) and of the dense model,
their ratio, router top-1 accuracy against the oracle expert, and greedy agreement with dense
(teacher-forced over held-out text, and free-running over a few prompts).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

from edge_readme.errors import DataError
from edge_readme.experts_format import load_float_experts
from edge_readme.loader import load_model
from edge_readme.model import ExpertWeights, KVCache, Transformer, build_transformer
from edge_readme.router import Router
from edge_readme.tokenizer import Tokenizer

from . import functional as fn
from . import targets
from .corpus import by_domain, load_builtin, token_batches
from .masks import Masks

PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time",
           "Permission is hereby granted", "How do I")


class MemoryExperts:
    """An all-in-memory expert provider: {(layer, expert): [3, rows, D]}."""

    def __init__(self, experts: dict[tuple[int, int], torch.Tensor]):
        self.w = {k: ExpertWeights(gate_up=v[:2].reshape(-1, v.shape[2]), down=v[2].t())
                  for k, v in experts.items()}

    @contextmanager
    def get(self, layer: int, expert: int):
        yield self.w[(layer, expert)]


def load_experts(folder: Path) -> dict[tuple[int, int], torch.Tensor]:
    return load_float_experts(folder)


def open_moe(folder: str | Path, weights: str | None = None):
    """(loaded model, runtime Transformer with experts attached, Router, Masks). weights: the
    resident weights' format (None: float32 as stored; experts are always float32 here)."""
    folder = Path(folder)
    loaded = load_model(folder)
    c = loaded.config
    model = build_transformer(c, loaded.tensors, "cpu", torch.float32, weights=weights)
    model.attach_experts(MemoryExperts(load_experts(folder)))
    m = c.moe
    router = Router.from_tensors(m.router, m.num_experts, c.num_layers, m.routing, loaded.tensors)
    masks = Masks.from_tensors(load_file(str(folder / "masks.safetensors")), c.num_layers,
                               m.num_experts, str(folder / "masks.safetensors"))
    return loaded, model, router, masks


@torch.no_grad()
def seq_logits(model: Transformer, ids: torch.Tensor, route=None,
               kv_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    cache = KVCache(model.c, len(ids), dtype=kv_dtype)
    return model(ids, cache, 0, route=route, all_logits=True)  # [T, V]


def nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    return float(F.cross_entropy(logits[:-1], ids[1:], reduction="sum")), len(ids) - 1


@torch.no_grad()
def greedy(model: Transformer, ids: list[int], n: int, router: Router | None) -> list[int]:
    cache = KVCache(model.c, len(ids) + n)
    rcache = router.new_cache(len(ids) + n) if router is not None else None
    x, pos, out = torch.tensor(ids), 0, []
    for _ in range(n):
        route = router.route(x, rcache, pos) if router is not None else None
        tok = int(model(x, cache, pos, route=route).argmax(-1)[-1])
        pos += len(x)
        out.append(tok)
        x = torch.tensor([tok])
    return out


def evaluate(moe_folder, docs=None, reference=None, seq_len: int = 256,
             sequences_per_domain: int = 4, gen_tokens: int = 16,
             progress: bool = True, weights: str | None = None) -> dict[str, Any]:
    """docs: corpus Documents (default: the builtin held-out split); reference: dense model.
    weights: the runtime weight format of both models (None: float32 as stored)."""
    loaded, model, router, masks = open_moe(moe_folder, weights)
    tok = Tokenizer(loaded.tokenizer, loaded.chat_template)
    docs = load_builtin("heldout") if docs is None else [d for d in docs if d.split == "heldout"]
    groups = {n: token_batches(g, tok.encode, seq_len, sequences_per_domain)
              for n, g in by_domain(docs).items()}
    dense = None
    if reference is not None:
        ref = load_model(reference)
        dense = build_transformer(ref.config, ref.tensors, "cpu", torch.float32,
                                  weights=weights)
        bb = fn.Backbone.create(ref.config, ref.tensors, seq_len)
    report: dict[str, Any] = {"domains": {}}
    hits, agree, total = 0, 0, 0
    bar = tqdm(total=sum(map(len, groups.values())), desc="evaluate", unit="seq",
               disable=not progress)
    for name, seqs in groups.items():
        acc = {"moe": [0.0, 0], "dense": [0.0, 0]}
        for s in seqs:
            ids = torch.tensor(s)
            route = router.route(ids)  # [T, L]
            lm = seq_logits(model, ids, route)
            _add(acc["moe"], nll(lm, ids))
            if dense is not None:
                ld = seq_logits(dense, ids)
                _add(acc["dense"], nll(ld, ids))
                agree += int((lm.argmax(-1) == ld.argmax(-1)).sum())
                scores = targets.expert_scores(bb, [s], masks, progress=False)[0]
                want = targets.oracle(scores, router.routing)
                got = route[:, 0] if router.routing == "global" else route
                hits += int((got == want).sum())
                total += len(s)
            bar.update(1)
        report["domains"][name] = _domain_row(acc)
    bar.close()
    if dense is not None and total == 0:
        raise DataError("the held-out data gives no sequence to evaluate; give more text "
                        "(--data) or a smaller --seq-len")
    if dense is not None:
        report["router_accuracy"] = hits / total / (1 if router.routing == "global"
                                                    else model.c.num_layers)
        report["teacher_forced_agreement"] = agree / total
        report["greedy_prefix_agreement"] = _greedy_agreement(model, dense, router, tok,
                                                              gen_tokens)
    rows = [r for r in report["domains"].values() if "ratio" in r]
    if rows:
        report["mean_ratio"] = sum(r["ratio"] for r in rows) / len(rows)
        report["max_ratio"] = max(r["ratio"] for r in rows)
    return report


def _add(acc: list, item: tuple[float, int]) -> None:
    acc[0] += item[0]
    acc[1] += item[1]


def _domain_row(acc) -> dict[str, float]:
    row = {"moe_ppl": math.exp(acc["moe"][0] / acc["moe"][1])}
    if acc["dense"][1]:
        row["dense_ppl"] = math.exp(acc["dense"][0] / acc["dense"][1])
        row["ratio"] = row["moe_ppl"] / row["dense_ppl"]
    return row


def _greedy_agreement(model, dense, router, tok, n: int) -> float:
    """Mean fraction of the first n greedy tokens that match dense before the first mismatch."""
    fracs = []
    for p in PROMPTS:
        ids = tok.encode(p)
        a, b = greedy(model, ids, n, router), greedy(dense, ids, n, None)
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), n)
        fracs.append(same / n)
    return sum(fracs) / len(fracs)
