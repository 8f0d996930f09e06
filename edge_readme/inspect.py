"""`edge-readme info`: architecture, parameter counts and bytes by part, read from file headers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelFormatError
from .loader import GGUF_MAGIC, _gguf_to_hf, _open_gguf, safetensors_files

PARTS = (("embeddings", ("embed_tokens", "lm_head")), ("router", ("router.",)),
         ("shared_expert", ("mlp.shared.",)), ("ffn", ("mlp.",)), ("attention", ("self_attn.",)),
         ("norms", ("norm",)))


def _part(name: str) -> str:
    for part, keys in PARTS:
        if any(k in name for k in keys):
            return part
    return "other"


def _tensor_sizes(path: Path) -> list[tuple[str, int, int]]:
    """(hf name, parameters, bytes on disk) for every tensor."""
    if path.is_dir():
        out = []
        for f in safetensors_files(path):
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                numel = 1
                for d in meta["shape"]:
                    numel *= d
                out.append((name, numel, meta["data_offsets"][1] - meta["data_offsets"][0]))
        return out
    with open(path, "rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise ModelFormatError(f"{path}: not a GGUF file or model folder")
    g = _open_gguf(path)
    return [(_gguf_to_hf(t.name) or t.name, int(np.prod(t.shape)), t.nbytes) for t in g.tensors]


def describe(path: Path) -> dict[str, Any]:
    from .loader import load_config

    config = load_config(path)
    params: dict[str, int] = {}
    size: dict[str, int] = {}
    for name, numel, nbytes in _tensor_sizes(path):
        part = _part(name)
        params[part] = params.get(part, 0) + numel
        size[part] = size.get(part, 0) + nbytes
    d: dict[str, Any] = {
        "path": str(path),
        "architecture": config.architecture + (" (Read-ME MoE)" if config.moe else ""),
        "layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "ffn_size": config.intermediate_size,
        "heads": f"{config.num_heads} query / {config.num_kv_heads} kv, head_dim {config.head_dim}",
        "vocab_size": config.vocab_size,
        "context_length": config.max_position,
        "tied_embeddings": config.tie_embeddings,
    }
    if config.moe is not None:
        from .experts_format import read_manifest

        m = read_manifest(path)
        rows = sum(e.rows for e in m.entries)
        params["experts"] = rows * 3 * m.hidden_size
        size["experts"] = sum(e.length for e in m.entries)
        d["experts"] = f"{m.num_experts} per layer, routing {config.moe.routing}, " \
                       f"{len(m.entries)} (layer, expert) blocks, largest {m.max_length} bytes"
    d["parameters"] = {k: f"{v:,}" for k, v in params.items()} | {
        "total": f"{sum(params.values()):,}"}
    d["bytes"] = {k: _mib(v) for k, v in size.items()} | {"total": _mib(sum(size.values()))}
    return d


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
