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
from . import targets

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


@torch.inference_mode()
def mean_abs_activation(bb: fn.Backbone, seqs: list[list[int]], batch: int = 8,
                        bar: tqdm | None = None, codes: torch.Tensor | None = None) -> torch.Tensor:
    """Mean |act| over all tokens of `seqs`: [L, F]. With `codes` (uint8 [N, T, L, F]) the same
    pass also stores each token's router-target level codes, so targets need no second pass."""
    c = bb.config
    total = torch.zeros(c.num_layers, c.intermediate_size, dtype=torch.float64)
    for i, ids in enumerate(_batches(seqs, batch)):
        out = None if codes is None else codes[i * batch:i * batch + len(ids)]

        def hook(layer, act, out=out):
            total[layer] += act.abs().sum(dim=(0, 1), dtype=torch.float32).double()
            if out is not None:
                out[:, :, layer] = targets.level_codes(act.reshape(-1, act.shape[-1])).view(
                    act.shape)

        fn.dense_forward(bb, ids, hook, head=False)
        if bar is not None:
            bar.update(ids.numel())
    return (total / max(1, sum(len(s) for s in seqs))).float()


def domain_stats(bb: fn.Backbone, groups: dict[str, list[list[int]]], fingerprint: str,
                 cache_dir: Path | None, progress: bool = True, with_codes: bool = False):
    """Per-domain mean |act| [G, L, F], resumed from the cache where present. With `with_codes`
    also the level codes of all sequences in group order, uint8 [N, T, L, F]: (stats, codes)."""
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
    codes = None
    if with_codes:
        c, seqs = bb.config, [s for v in groups.values() for s in v]
        codes = torch.empty(len(seqs), len(seqs[0]), c.num_layers, c.intermediate_size,
                            dtype=torch.uint8)
    starts = [0]
    for v in groups.values():
        starts.append(starts[-1] + len(v))
    names = list(groups)
    n_tok = sum(len(s) for _, name, _ in todo for s in groups[name])
    with tqdm(total=n_tok, desc="calibrate", unit="tok", disable=not progress or not todo) as bar:
        for g, name, path in todo:
            bar.set_postfix_str(name)
            part = None if codes is None else codes[starts[g]:starts[g + 1]]
            stats = mean_abs_activation(bb, groups[name], bar=bar, codes=part)
            if path is not None:
                atomic_save({"mean_abs": stats}, path)
            out[g] = stats
    if codes is not None:  # groups whose statistics came from the cache still need their codes
        done = {g for g, _, _ in todo}
        for g, name in enumerate(names):
            if g not in done:
                codes[starts[g]:starts[g + 1]] = targets.activation_codes(
                    bb, groups[name], progress, desc=f"router targets {name}")
    stats = torch.stack(out)  # type: ignore[arg-type]
    return (stats, codes) if with_codes else stats


# ---- unlabelled data: k-means over token activation patterns ------------------------------


@torch.inference_mode()
def token_features(bb: fn.Backbone, seqs: list[list[int]], seed: int,
                   progress: bool = True) -> torch.Tensor:
    """Per token, each layer's |act| randomly projected to PROJ_DIM and normalised: [N, L*P]."""
    c = bb.config
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(c.num_layers, c.intermediate_size, PROJ_DIM, generator=gen)
    feats: list[torch.Tensor] = []
    cur: list[torch.Tensor] = []

    def hook(layer, act):
        a = act.abs().reshape(-1, act.shape[-1]).float()
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


@torch.inference_mode()
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
        total[:, layer].index_add_(0, lab, a)  # [k, F]

    with tqdm(total=sum(map(len, seqs)), desc="cluster stats", unit="tok",
              disable=not progress) as bar:
        for ids in _batches(seqs, 4):
            fn.dense_forward(bb, ids, hook, head=False)
            offset[0] += ids.numel()
            bar.update(ids.numel())
    return (total / count[:, None, None]).float()
