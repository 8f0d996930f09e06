"""Write a refactored MoE model folder, all or nothing.

Everything goes into a temporary folder beside the target, each file fsynced, then one rename
puts it in place: an interrupted run leaves the old target (or none), never half a model.

    config.json             ModelConfig.to_hf_dict() with its `moe` fields
    model.safetensors       embeddings, attention, norms, shared experts, router.*
    experts.safetensors     one aligned [3, rows, D] tensor per (layer, expert) + experts.json
    masks.safetensors       int32 neuron indices: layers.{i}.shared, layers.{i}.experts.{e}
    tokenizer.json, tokenizer_config.json (chat_template), refactor.json (provenance)
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from edge_readme.config import ModelConfig
from edge_readme.errors import DataError, EdgeReadmeError
from edge_readme.experts_format import dtype_name, write_experts
from edge_readme.fsutil import remove_orphans
from edge_readme.quant import q4
from edge_readme.quant.experts import supported as q4_supported

from . import functional as fn
from .masks import Masks

DENSE_SKIP = (".mlp.gate_proj.", ".mlp.up_proj.", ".mlp.down_proj.")


def check_target(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise DataError(f"{out}: target already exists; pass force=True (--force) to replace it "
                        "or choose another output folder")


def dense_part(bb: fn.Backbone, layers: list[fn.MoELayer], router_tensors: dict,
               dtype: torch.dtype, expert_format: str = "f16") -> dict[str, torch.Tensor]:
    """The resident tensors. With q4 experts the projections are stored 4-bit too (`NAME.q4`,
    `NAME.q4_scale`, `NAME.q4_min`), which keeps a GGUF's 4-bit values exactly."""
    out = {n: t for n, t in bb.tensors.items() if not any(s in n for s in DENSE_SKIP)}
    for i, layer in enumerate(layers):
        g, u, d_t = layer.shared
        p = f"model.layers.{i}.mlp.shared."
        out.update({p + "gate_proj.weight": g, p + "up_proj.weight": u,
                    p + "down_proj.weight": d_t.t()})
    out.update(router_tensors)
    stored: dict[str, torch.Tensor] = {}
    for n, t in out.items():
        if expert_format == "q4" and n.endswith("_proj.weight") and t.dim() == 2 \
                and t.shape[1] % q4.GROUP == 0:
            stored.update({f"{n}.{k}": v for k, v in q4.encode_plain(t.detach()).items()})
        else:
            stored[n] = t.detach().to(dtype).contiguous()
    return stored


def expert_tensors(layers: list[fn.MoELayer]) -> dict[tuple[int, int], torch.Tensor]:
    return {(i, e): torch.stack([w.detach() for w in ex])  # [3, rows, D]
            for i, layer in enumerate(layers) for e, ex in enumerate(layer.experts)}


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def write_moe_folder(out: str | os.PathLike, config: ModelConfig, bb: fn.Backbone,
                     layers: list[fn.MoELayer], router_tensors: dict[str, torch.Tensor],
                     masks: Masks, tokenizer, chat_template: str | None,
                     provenance: dict[str, Any], force: bool = False,
                     dtype: torch.dtype = torch.float16, expert_format: str = "auto",
                     extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write the whole folder atomically; `tokenizer` is an edge_readme Tokenizer; `extra` maps
    more safetensors file names to their tensors (the trained deltas).

    expert_format: "q4" (int4 experts and projections), a float dtype name for the experts
    ("f16", "bf16", "f32"; other tensors are stored in `dtype`), or "auto": q4 where the hidden
    size allows it (a multiple of 64), else float16."""
    if expert_format == "auto":
        expert_format = "q4" if q4_supported(config.hidden_size) else "f16"
    expert_format = dtype_name(expert_format)
    out = Path(out)
    check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    for kind in ("tmp", "old"):  # what a killed build left behind (its PID is dead)
        remove_orphans(out.parent, f".{out.name}.{kind}-")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_files(tmp, config, bb, layers, router_tensors, masks, tokenizer, chat_template,
                     {**provenance, "expert_format": expert_format}, dtype, expert_format)
        for name, tensors in (extra or {}).items():
            save_file(tensors, str(tmp / name))
        _fsync_tree(tmp)
        _swap_in(tmp, out, force)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise EdgeReadmeError(f"{out}: disk full while writing the MoE model; nothing was "
                                  "left behind. Free space or choose another folder") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_files(tmp: Path, config, bb, layers, router_tensors, masks, tokenizer,
                 chat_template, provenance, dtype, expert_format) -> None:
    (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    save_file(dense_part(bb, layers, router_tensors, dtype, expert_format),
              str(tmp / "model.safetensors"), metadata={"format": "pt"})
    write_experts(tmp, expert_tensors(layers), expert_format)
    save_file(masks.to_tensors(), str(tmp / "masks.safetensors"))
    tokenizer._tok.save(str(tmp / "tokenizer.json"))
    spec = tokenizer.spec
    tcfg = {"chat_template": chat_template, "add_bos_token": bool(spec.add_bos),
            "bos_token": _tok_str(tokenizer, spec.bos_token_id),
            "eos_token": _tok_str(tokenizer, spec.eos_token_id)}
    (tmp / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
    (tmp / "refactor.json").write_text(json.dumps(provenance, indent=2))


def _tok_str(tokenizer, tid: int | None) -> str | None:
    return None if tid is None else tokenizer._tok.id_to_token(int(tid))


def _swap_in(tmp: Path, out: Path, force: bool) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    check_target(out, force)
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
