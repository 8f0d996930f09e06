"""Router distillation and Read-ME's alternating fine-tuning (router, then experts, in rounds).

Runs on CPU or CUDA in one process, or data-parallel under torchrun: when torch.distributed is
initialised, each rank takes every world-th batch and gradients are averaged with all_reduce
(gloo on CPU, nccl on CUDA). Parameters start identical on all ranks (broadcast from rank 0).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from edge_readme.router import Router

from . import functional as fn
from .delta import Deltas
from .targets import as_path

ROUNDS = 5  # Read-ME alternates router and expert tuning about five times
EXPERT_SHARE = 2 / 3  # of each round's steps (Read-ME: 100 router, 200 expert steps)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return _world()[0] == 0


def sync_params(params: list[torch.Tensor]) -> None:
    rank, world = _world()
    if world > 1:
        for p in params:
            dist.broadcast(p.data, src=0)


def _average_grads(params: list[torch.Tensor]) -> None:
    rank, world = _world()
    if world > 1:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world


def _cosine(step: int, total: int, lr: float) -> float:
    return lr * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(1, total)))


def _batch_ids(n: int, batch: int, step: int, seed: int) -> torch.Tensor:
    """This rank's slice of the step's global batch, the same permutation on every rank."""
    rank, world = _world()
    gen = torch.Generator().manual_seed(seed * 100003 + step // max(1, n // (batch * world)))
    perm = torch.randperm(n, generator=gen)
    start = (step % max(1, n // (batch * world))) * batch * world
    return perm[start + rank * batch:start + (rank + 1) * batch]


def router_loss(router: Router, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(router.forward_batch(ids), dim=-1)
    return -(target * logp).sum(-1).mean()


def train_router(router: Router, seqs: torch.Tensor, target: torch.Tensor, steps: int,
                 lr: float = 3e-3, batch: int = 8, seed: int = 0, progress: bool = True,
                 desc: str = "router") -> list[float]:
    """Cross-entropy toward the soft target. seqs [N, T]; target [N, T, (L,) E].

    Only the embedding rows of tokens in `seqs` get gradients (AdamW without decay leaves the
    others exactly as they are), so training runs on that slice: the optimiser then touches a
    few thousand rows instead of the whole vocabulary each step.
    """
    full = router.embed
    used = seqs.unique()  # [U]
    remap = torch.zeros(full.shape[0], dtype=torch.long, device=seqs.device)
    remap[used] = torch.arange(len(used), device=seqs.device)
    router.embed = torch.nn.Parameter(full.detach()[used].clone())  # [U, d]
    try:
        return _train_router(router, remap[seqs], target, steps, lr, batch, seed, progress, desc)
    finally:
        with torch.no_grad():
            full[used] = router.embed.detach()
        router.embed = full


def _train_router(router, seqs, target, steps, lr, batch, seed, progress, desc) -> list[float]:
    params = list(router.parameters())
    sync_params(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    batch = min(batch, len(seqs))
    for step in tqdm(range(steps), desc=desc, disable=not progress or not is_main()):
        idx = _batch_ids(len(seqs), batch, step, seed)
        for g in opt.param_groups:
            g["lr"] = _cosine(step, steps, lr)
        loss = router_loss(router, seqs[idx], target[idx])
        opt.zero_grad()
        loss.backward()
        _average_grads(params)
        opt.step()
        losses.append(loss.item())
    return losses


@torch.inference_mode()
def router_accuracy(router: Router, seqs: torch.Tensor, oracle: torch.Tensor) -> float:
    choice = router.forward_batch(seqs).argmax(-1)
    return float((choice == oracle).float().mean())


def distill_loss(bb: fn.Backbone, layers: list[fn.MoELayer], ids: torch.Tensor,
                 route: torch.Tensor) -> torch.Tensor:
    """KL(dense || MoE) over next-token distributions; ids [B, T], route [B, T, L]."""
    with torch.no_grad():
        teacher = F.log_softmax(fn.dense_forward(bb, ids), dim=-1)
    student = F.log_softmax(fn.moe_forward(bb, layers, ids, route), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean()


def train_experts(bb: fn.Backbone, layers: list[fn.MoELayer], router: Router,
                  seqs: torch.Tensor, steps: int, lr: float, batch: int, seed: int,
                  bar: tqdm | None = None, step0: int = 0,
                  deltas: Deltas | None = None) -> list[float]:
    """Distil the dense model into the experts (shared and routed) with the router frozen.

    With `deltas`, only their low-rank factors train (the layers' weights stay as they are)."""
    params = (deltas.parameters() if deltas is not None
              else [p for layer in layers for p in layer.parameters()])
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        ids = seqs[_batch_ids(len(seqs), batch, step0 + step, seed)]
        with torch.no_grad():
            route = as_path(router.forward_batch(ids).argmax(-1), bb.config.num_layers,
                            router.routing)
        student = deltas.apply(layers) if deltas is not None else layers
        loss = distill_loss(bb, student, ids, route)
        opt.zero_grad()
        loss.backward()
        _average_grads(params)
        opt.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(kl=f"{losses[-1]:.3f}")
    for p in params:
        p.requires_grad_(False)
    return losses


def finetune(bb: fn.Backbone, layers: list[fn.MoELayer], router: Router, seqs: torch.Tensor,
             target: torch.Tensor, steps: int, seq_len: int = 128, batch: int = 4,
             router_lr: float = 1e-3, expert_lr: float = 1e-4, seed: int = 0,
             progress: bool = True, expert_seqs: torch.Tensor | None = None,
             deltas: Deltas | None = None) -> dict[str, list[float]]:
    """`steps` optimiser steps in ROUNDS rounds of router then expert tuning, lr decaying.

    The router rounds fit `target` on `seqs`; the expert rounds distil the dense model on
    `expert_seqs` (default `seqs`), which needs no targets and so can be far more text: with only
    the calibration sequences, a few hundred steps overfit them. With `deltas` the expert rounds
    train their low-rank factors instead of the weights (pass `expert_lr` for them; merging them
    into the layers is the caller's)."""
    seqs, target = seqs[:, :seq_len], target[:, :seq_len]
    expert_seqs = seqs if expert_seqs is None else expert_seqs[:, :seq_len]
    sync_params([p for layer in layers for p in layer.parameters()] + list(router.parameters())
                + (deltas.parameters() if deltas is not None else []))
    rounds = max(1, min(ROUNDS, steps // 3))
    log: dict[str, list[float]] = {"router": [], "experts": []}
    with tqdm(total=steps, desc="fine-tune", unit="step",
              disable=not progress or not is_main()) as bar:
        done = 0
        for r in range(rounds):
            n = steps // rounds + (1 if r < steps % rounds else 0)
            n_exp = max(1, round(n * EXPERT_SHARE)) if n > 1 else n
            decay = 0.5 ** r
            if n - n_exp > 0:
                log["router"] += train_router(router, seqs, target, n - n_exp, router_lr * decay,
                                              batch, seed + 7 * r, progress=False)
                bar.update(n - n_exp)
            log["experts"] += train_experts(bb, layers, router, expert_seqs, n_exp,
                                            expert_lr * decay, batch, seed + 13 * r, bar, done,
                                            deltas)
            done += n
    return log
