"""`refactor()`: dense Llama -> Read-ME router-decoupled MoE folder, end to end.

Stages (each with a progress bar): tokenize calibration data, activation statistics (cached,
resumable), masks, router targets, router distillation, recovery (least-squares refit),
optional alternating fine-tuning, atomic write.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from edge_readme.config import MoEConfig, RouterConfig
from edge_readme.errors import DataError
from edge_readme.experts_format import dtype_name
from edge_readme.loader import load_model
from edge_readme.router import Router
from edge_readme.tokenizer import Tokenizer

from . import allocate, calibrate, targets, train
from . import functional as fn
from . import recovery as rec
from .corpus import by_domain, load_builtin, load_user_data, token_batches
from .delta import FOLDER_DELTAS, Deltas
from .masks import Masks, build_masks, check_fraction
from .writer import check_target, write_moe_folder

RECOVERY = ("none", "refit")
ALLOCATION = ("sensitivity", "uniform")
MIN_TOKENS_PER_CLUSTER = 64
DELTA_LR = 2e-3  # AdamW lr of the low-rank factors (full-weight fine-tuning uses 1e-4): with
# A ~ N(0, 1/D) a step moves a weight by about as much as a full-weight step does


@dataclasses.dataclass
class Calibration:
    """Tokenized data: per-domain train sequences and held-out sequences, each [N, T]."""

    names: list[str]
    train: dict[str, list[list[int]]]
    heldout: dict[str, list[list[int]]]

    def train_tensor(self) -> torch.Tensor:
        return torch.tensor([s for n in self.names for s in self.train[n]], dtype=torch.long)

    def heldout_tensor(self) -> torch.Tensor:
        seqs = [s for n in self.names for s in self.heldout.get(n, [])]
        return torch.tensor(seqs, dtype=torch.long)


def load_docs(data: Sequence[str | os.PathLike] | None, domains: Sequence[str] | None = None):
    """The builtin corpus (or the user's files); `domains` keeps only those domains."""
    docs = load_builtin() if data is None else load_user_data(list(data))
    if not domains:
        return docs
    have = {d.domain for d in docs}
    unknown = [d for d in domains if d not in have]
    if unknown:
        raise DataError(f"calibration domains {unknown} are not in the data; it has "
                        f"{sorted(have)}")
    return [d for d in docs if d.domain in set(domains)]


def tokenize(docs, encode, seq_len: int, per_domain: int, heldout_per_domain: int) -> Calibration:
    groups = by_domain([d for d in docs if d.split == "train"])
    if not groups:
        raise DataError("calibration data has no training documents; add text to the files")
    train_seqs = {n: token_batches(g, encode, seq_len, per_domain) for n, g in groups.items()}
    held: dict[str, list[list[int]]] = {}
    held_docs = [d for d in docs if d.split == "heldout"] if heldout_per_domain > 0 else []
    for n, g in by_domain(held_docs).items():
        try:
            held[n] = token_batches(g, encode, seq_len, heldout_per_domain)
        except DataError:
            continue  # too little held-out text in this domain: it is left out of accuracy
    return Calibration(list(train_seqs), train_seqs, held)


def check_args(active_fraction: float, recovery: str, finetune_steps: int,
               experts: int | None, allocation: str = "uniform", delta_rank: int = 0) -> None:
    check_fraction(active_fraction)
    if recovery not in RECOVERY:
        raise DataError(f"recovery is {recovery!r}; expected one of {RECOVERY}")
    if allocation not in ALLOCATION:
        raise DataError(f"layer allocation is {allocation!r}; expected one of {ALLOCATION}")
    if not isinstance(finetune_steps, int) or finetune_steps < 0:
        raise DataError(f"finetune_steps is {finetune_steps!r}; expected an integer >= 0")
    if not isinstance(delta_rank, int) or delta_rank < 0:
        raise DataError(f"delta_rank is {delta_rank!r}; expected an integer >= 0 (0: train the "
                        "full expert weights)")
    if delta_rank and not finetune_steps:
        raise DataError(f"delta_rank is {delta_rank} but finetune_steps is 0; the low-rank "
                        "corrections are trained by the fine-tuning, so give --finetune-steps N")
    if experts is not None and (not isinstance(experts, int) or experts < 2):
        raise DataError(f"experts is {experts!r}; a Read-ME MoE needs at least 2 experts")


def group_stats(bb: fn.Backbone, cal: Calibration, experts: int | None, fingerprint: str,
                cache_dir: Path | None, seed: int, progress: bool):
    """[E, L, F] statistics, the expert names (domains, or k-means clusters) and the training
    sequences' router-target level codes [N, T, L, F] (see targets.level_codes)."""
    n = experts or len(cal.names)
    if experts is None and len(cal.names) < 2:
        raise DataError(f"calibration data has one domain ({cal.names[0]!r}); give at least two "
                        "labelled domains, or pass experts=N to cluster token activations")
    if n == len(cal.names):
        stats, codes = calibrate.domain_stats(bb, cal.train, fingerprint, cache_dir, progress,
                                              with_codes=True)  # one dense pass for both
        return stats, cal.names, codes
    seqs = [s for name in cal.names for s in cal.train[name]]
    tokens = sum(map(len, seqs))
    if n * MIN_TOKENS_PER_CLUSTER > tokens:
        raise DataError(f"{n} experts need at least {n * MIN_TOKENS_PER_CLUSTER} calibration "
                        f"tokens ({MIN_TOKENS_PER_CLUSTER} per expert); the data has {tokens}. "
                        "Add data or ask for fewer experts")
    labels = calibrate.kmeans(calibrate.token_features(bb, seqs, seed, progress), n, seed)
    counts = torch.bincount(labels, minlength=n)
    if int(counts.min()) == 0:
        raise DataError(f"the data supports fewer than {n} experts: k-means left "
                        f"{int((counts == 0).sum())} clusters empty. Ask for fewer experts")
    stats = calibrate.cluster_stats(bb, seqs, labels, n, progress)
    return stats, [f"cluster{i}" for i in range(n)], targets.activation_codes(bb, seqs, progress)


def moe_params(config, masks: Masks, router: Router) -> dict[str, int]:
    """Per-token active parameters against total (router included in both)."""
    c = config
    D = c.hidden_size
    base = c.vocab_size * D * (1 if c.tie_embeddings else 2) + D
    base += c.num_layers * (2 * D + D * c.q_dim * 2 + 2 * D * c.kv_dim)
    shared = sum(len(s) for s in masks.shared) * 3 * D
    per_expert = [sum(len(x[e]) for x in masks.experts) * 3 * D
                  for e in range(masks.num_experts)]
    r = router.num_parameters()
    dense_ffn = c.num_layers * 3 * D * c.intermediate_size
    return {"total": base + shared + sum(per_expert) + r,
            "active": base + shared + round(sum(per_expert) / len(per_expert)) + r,
            "dense_total": base + dense_ffn, "router": r,
            "active_ffn_fraction": masks.active_rows() / c.intermediate_size}


def refactor(model_path, out, data=None, experts=None, active_fraction=0.5, finetune_steps=0,
             recovery="refit", seq_len=256, sequences_per_domain=16, seed=0, device="cpu",
             force=False, progress=True, routing="global", router_steps=400,
             router_config: RouterConfig | None = None, cache_dir=None,
             heldout_sequences=4, allocation="sensitivity", domains=None, expert_format="auto",
             delta_rank=0, delta_lr=DELTA_LR, _on_done=None) -> dict[str, Any]:
    """Refactor the dense model at `model_path` into a MoE folder at `out`; returns a report.

    `allocation`: "sensitivity" spreads the active neurons over layers by their measured
    fragility (allocate.py; the mean per layer stays `active_fraction`), "uniform" keeps
    `active_fraction` of every layer. `domains`: only these domains of the data, one expert
    each. `delta_rank` > 0: the fine-tuning trains rank-`delta_rank` corrections to the experts
    (delta.py, lr `delta_lr`) instead of their full weights; they are merged into the written
    weights and also kept, with the router the refit was routed by, in the folder's
    `deltas.safetensors` (what `build_default.export_artifacts` ships)."""
    out = Path(out)
    check_args(active_fraction, recovery, finetune_steps, experts, allocation, delta_rank)
    if expert_format != "auto":
        expert_format = dtype_name(expert_format)  # a bad --expert-format fails before the work
    check_target(out, force)
    docs = load_docs(data, domains)
    torch.manual_seed(seed)
    loaded = load_model(model_path)
    tok = Tokenizer(loaded.tokenizer, loaded.chat_template)
    cal = tokenize(docs, tok.encode, seq_len, sequences_per_domain, heldout_sequences)
    bb = fn.Backbone.create(loaded.config, loaded.tensors, seq_len)
    fast = bb.to(fn.fast_dtype())  # no-grad passes; slicing and solves use the float32 bb
    cache = Path(cache_dir) if cache_dir is not None else calibrate.default_cache_dir()
    fp = calibrate.model_fingerprint(Path(model_path))
    stats, names, codes = group_stats(fast, cal, experts, fp, cache, seed, progress)
    seqs = cal.train_tensor()
    rows = None
    if allocation == "sensitivity" and active_fraction < 1:
        costs = allocate.layer_costs(bb, fast, stats, seqs, codes, routing, progress=progress)
        rows = allocate.allocate(costs, active_fraction, loaded.config.intermediate_size)
    masks = build_masks(stats, active_fraction, rows)
    rcfg = router_config or RouterConfig()
    router = Router.init_from_embedding(rcfg, bb.tensors["model.embed_tokens.weight"],
                                        masks.num_experts, loaded.config.num_layers, routing, seed)
    soft = targets.soft_target(targets.scores_from_codes(codes, masks), routing)  # [N, T, (L,) E]
    del codes
    report: dict[str, Any] = {"domains": names, "active_fraction": active_fraction,
                              "allocation": allocation, "recovery": recovery,
                              "finetune_steps": finetune_steps}
    if rows is not None:
        report["layer_rows"] = rows
    report["router_loss"] = train.train_router(router, seqs, soft, router_steps, seed=seed,
                                               progress=progress)[-5:]
    held_codes = heldout_codes(fast, cal, progress)
    report["router_accuracy"] = heldout_accuracy(router, cal, held_codes, masks, routing)
    layers = [fn.slice_layer(bb, i, masks.shared[i], masks.experts[i])
              for i in range(loaded.config.num_layers)]
    route = targets.as_path(router.forward_batch(seqs).argmax(-1).detach(),
                            loaded.config.num_layers, routing)
    if recovery == "refit":
        rec.refit(bb, layers, seqs, route, progress=progress, dtype=fast.dtype)
    extra = None
    if finetune_steps:
        deltas = Deltas.create(layers, delta_rank, seed) if delta_rank else None
        if deltas is not None:
            extra = {f"refit_{k}": v.detach().clone() for k, v in router.state_tensors().items()}
        report["finetune"] = _last(train.finetune(
            bb, layers, router, seqs, soft, finetune_steps, seed=seed, progress=progress,
            expert_seqs=finetune_sequences(docs, tok.encode, min(seq_len, 128)),
            expert_lr=delta_lr if deltas is not None else 1e-4, deltas=deltas))
        if deltas is not None:
            deltas.merge_into(layers)
            extra = {**deltas.to_tensors(), **{k: v.half() for k, v in extra.items()}}
            report["delta"] = {"rank": delta_rank, "lr": delta_lr,
                               "parameters": deltas.num_parameters()}
        report["router_accuracy_after_finetune"] = heldout_accuracy(
            router, cal, held_codes, masks, routing)
    report["params"] = moe_params(loaded.config, masks, router)
    moe = MoEConfig(num_experts=masks.num_experts, routing=routing,
                    shared_sizes=tuple(len(s) for s in masks.shared), router=rcfg,
                    domains=tuple(names))
    config = dataclasses.replace(loaded.config, moe=moe)
    if _on_done is not None:  # distributed tests compare the trained weights across ranks
        _on_done({"tensors": list(router.state_tensors().values())
                  + [p for layer in layers for p in layer.parameters()]})
    if train.is_main():
        write_moe_folder(out, config, bb, layers, router.state_tensors(), masks, tok,
                         loaded.chat_template, _provenance(report, seq_len, sequences_per_domain,
                                                           seed, model_path), force,
                         expert_format=expert_format,
                         extra={FOLDER_DELTAS: extra} if extra else None)
    return report


def finetune_sequences(docs, encode, seq_len: int = 128, per_domain: int = 1024) -> torch.Tensor:
    """All the training text cut into `seq_len`-token sequences, for the expert distillation."""
    train_docs = by_domain([d for d in docs if d.split == "train"])
    seqs = [s for group in train_docs.values()
            for s in token_batches(group, encode, seq_len, per_domain)]
    return torch.tensor(seqs, dtype=torch.long)


def heldout_codes(bb, cal: Calibration, progress: bool) -> torch.Tensor | None:
    held = cal.heldout_tensor()
    if not len(held):
        return None
    return targets.activation_codes(bb, held.tolist(), progress, desc="held-out targets")


def heldout_accuracy(router: Router, cal: Calibration, codes: torch.Tensor | None, masks: Masks,
                     routing: str) -> float | None:
    if codes is None:
        return None
    scores = targets.scores_from_codes(codes, masks)
    return train.router_accuracy(router, cal.heldout_tensor(), targets.oracle(scores, routing))


def _last(log: dict[str, list[float]]) -> dict[str, float | None]:
    return {k: (v[-1] if v else None) for k, v in log.items()}


def _provenance(report, seq_len, per_domain, seed, model_path) -> dict[str, Any]:
    return {**report, "seq_len": seq_len, "sequences_per_domain": per_domain, "seed": seed,
            "source": str(model_path), "pass_dtype": str(fn.fast_dtype()).split(".")[-1]}
