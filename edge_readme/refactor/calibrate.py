"""Activation statistics of the dense model: mean |down_proj input| per neuron per layer per group.

A group is a labelled domain, or a k-means cluster of token activation patterns for unlabelled
data. Statistics are cached on disk per group (safetensors, written atomically), keyed by the
model and the exact token ids, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import functional as fn

PROJ_DIM = 16  # random projection width per layer for k-means features


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edge-readme" / "refactor"


def model_fingerprint(path: Path) -> str:
    st = Path(path).stat()
    return f"{Path(path).resolve()}:{st.st_size}:{int(st.st_mtime)}"


def cache_key(fingerprint: str, seqs: list[list[int]], what: str) -> str:
    h = hashlib.sha256(f"{what}|{fingerprint}".encode())
    for s in seqs:
        h.update(torch.tensor(s, dtype=torch.int32).numpy().tobytes())
    return h.hexdigest()[:24]


def atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _batches(seqs: list[list[int]], batch: int):
    for i in range(0, len(seqs), batch):
        yield torch.tensor(seqs[i:i + batch], dtype=torch.long)  # [B, T]


@torch.no_grad()
def mean_abs_activation(bb: fn.Backbone, seqs: list[list[int]], batch: int = 4,
                        bar: tqdm | None = None) -> torch.Tensor:
    """Mean |act| over all tokens of `seqs`: [L, F]."""
    c = bb.config
    total = torch.zeros(c.num_layers, c.intermediate_size, dtype=torch.float64)

    def hook(layer, act):
        total[layer] += act.abs().sum(dim=(0, 1)).double()

    for ids in _batches(seqs, batch):
        fn.dense_forward(bb, ids, hook, head=False)
        if bar is not None:
            bar.update(ids.numel())
    return (total / max(1, sum(len(s) for s in seqs))).float()


def domain_stats(bb: fn.Backbone, groups: dict[str, list[list[int]]], fingerprint: str,
                 cache_dir: Path | None, progress: bool = True) -> torch.Tensor:
    """Per-domain mean |act|: [G, L, F], resumed from the cache where present."""
    out: list[torch.Tensor | None] = []
    todo: list[tuple[int, str, Path | None]] = []
    for g, (name, seqs) in enumerate(groups.items()):
        path = None
        if cache_dir is not None:
            path = Path(cache_dir) / f"stats-{cache_key(fingerprint, seqs, name)}.safetensors"
        if path is not None and path.exists():
            out.append(load_file(str(path))["mean_abs"])
        else:
            out.append(None)
            todo.append((g, name, path))
    n_tok = sum(len(s) for _, name, _ in todo for s in groups[name])
    with tqdm(total=n_tok, desc="calibrate", unit="tok", disable=not progress or not todo) as bar:
        for g, name, path in todo:
            bar.set_postfix_str(name)
            stats = mean_abs_activation(bb, groups[name], bar=bar)
            if path is not None:
                atomic_save({"mean_abs": stats}, path)
            out[g] = stats
    return torch.stack(out)  # type: ignore[arg-type]


# ---- unlabelled data: k-means over token activation patterns ------------------------------


@torch.no_grad()
def token_features(bb: fn.Backbone, seqs: list[list[int]], seed: int,
                   progress: bool = True) -> torch.Tensor:
    """Per token, each layer's |act| randomly projected to PROJ_DIM and normalised: [N, L*P]."""
    c = bb.config
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(c.num_layers, c.intermediate_size, PROJ_DIM, generator=gen)
    feats: list[torch.Tensor] = []
    cur: list[torch.Tensor] = []

    def hook(layer, act):
        a = act.abs().reshape(-1, act.shape[-1])
        cur.append(torch.nn.functional.normalize(a @ proj[layer], dim=-1))  # [N, P]

    with tqdm(total=sum(map(len, seqs)), desc="features", unit="tok", disable=not progress) as bar:
        for ids in _batches(seqs, 4):
            cur.clear()
            fn.dense_forward(bb, ids, hook, head=False)
            feats.append(torch.cat(cur, dim=-1))
            bar.update(ids.numel())
    return torch.cat(feats)


def kmeans(x: torch.Tensor, k: int, seed: int, iters: int = 25) -> torch.Tensor:
    """Cluster rows of x [N, F] into k groups (k-means++ start); returns labels [N]."""
    gen = torch.Generator().manual_seed(seed)
    centres = [x[torch.randint(len(x), (1,), generator=gen)].squeeze(0)]
    for _ in range(1, k):
        d = torch.cdist(x, torch.stack(centres)).min(dim=1).values ** 2
        centres.append(x[torch.multinomial(d + 1e-12, 1, generator=gen)].squeeze(0))
    c = torch.stack(centres)
    labels = torch.zeros(len(x), dtype=torch.long)
    for _ in range(iters):
        labels = torch.cdist(x, c).argmin(dim=1)
        for j in range(k):
            members = x[labels == j]
            if len(members):
                c[j] = members.mean(dim=0)
    return labels


@torch.no_grad()
def cluster_stats(bb: fn.Backbone, seqs: list[list[int]], labels: torch.Tensor, k: int,
                  progress: bool = True) -> torch.Tensor:
    """Mean |act| per cluster of tokens: [k, L, F]."""
    c = bb.config
    total = torch.zeros(k, c.num_layers, c.intermediate_size, dtype=torch.float64)
    count = torch.bincount(labels, minlength=k).clamp(min=1).double()
    offset = [0]

    def hook(layer, act):
        a = act.abs().reshape(-1, act.shape[-1]).double()
        lab = labels[offset[0]:offset[0] + a.shape[0]]
        total[:, layer].index_add_(0, lab, a)

    with tqdm(total=sum(map(len, seqs)), desc="cluster stats", unit="tok",
              disable=not progress) as bar:
        for ids in _batches(seqs, 4):
            fn.dense_forward(bb, ids, hook, head=False)
            offset[0] += ids.numel()
            bar.update(ids.numel())
    return (total / count[:, None, None]).float()
