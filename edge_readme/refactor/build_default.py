"""Rebuild the default MoE from the dense GGUF plus small shipped artifacts.

`edge_readme/artifacts/` holds `default_moe.json` (settings, the GGUF sha256 the artifacts are
tied to), `default_masks.safetensors` and `default_router.safetensors` (fp16; the router embedding
is stored only for the rows training changed, the rest is the GGUF embedding's first columns).
The training-free refit then runs here, on the builtin calibration corpus, routed by that router.
When `default_deltas.safetensors` is there (a trained recovery, see delta.py), its low-rank
factors are added to the refitted float weights and its `router.*` tensors (same compact form)
replace the router: distillation tuned both after the refit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from edge_readme.config import MoEConfig, RouterConfig
from edge_readme.errors import ModelFormatError
from edge_readme.loader import load_model
from edge_readme.registry import artifacts_digest
from edge_readme.router import Router
from edge_readme.tokenizer import Tokenizer

from . import functional as fn
from . import recovery, targets
from .delta import FOLDER_DELTAS, Deltas
from .masks import Masks
from .pipeline import load_docs, tokenize
from .writer import write_moe_folder

META, MASKS, ROUTER = "default_moe.json", "default_masks.safetensors", "default_router.safetensors"
DELTAS = "default_deltas.safetensors"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_artifacts(moe_folder: Path, gguf_path: Path, dest: Path) -> None:
    """Shrink a refactored folder (made from `gguf_path`) into the shipped artifacts.

    A folder refactored with `delta_rank` holds `deltas.safetensors` (the low-rank factors and the
    router the refit was routed by): that router becomes `default_router.safetensors`, and the
    factors plus the folder's (fine-tuned) router become `default_deltas.safetensors`."""
    moe = load_model(moe_folder)
    dense = load_model(gguf_path)
    m = moe.config.moe
    base = Router.init_from_embedding(m.router, dense.tensors["model.embed_tokens.weight"],
                                      m.num_experts, moe.config.num_layers, m.routing).embed
    router = {k: moe.tensors[k] for k in moe.tensors if k.startswith("router.")}
    dest.mkdir(parents=True, exist_ok=True)
    extra = Path(moe_folder) / FOLDER_DELTAS
    if extra.exists():
        t = load_file(str(extra))
        refit_router = {k[len("refit_"):]: v for k, v in t.items() if k.startswith("refit_router.")}
        factors = {k: v for k, v in t.items() if not k.startswith("refit_router.")}
        save_file({**factors, **_compact(router, base)}, str(dest / DELTAS))
        router = refit_router
    else:
        (dest / DELTAS).unlink(missing_ok=True)
    save_file(_compact(router, base), str(dest / ROUTER))
    save_file(load_file(str(Path(moe_folder) / "masks.safetensors")), str(dest / MASKS))
    prov = json.loads((Path(moe_folder) / "refactor.json").read_text())
    meta = {"gguf_sha256": sha256_file(gguf_path), "moe": m.to_dict(), "refactor": prov}
    (dest / META).write_text(json.dumps(meta, indent=2))


def _compact(router: dict[str, torch.Tensor], base: torch.Tensor) -> dict[str, torch.Tensor]:
    """fp16 router tensors, the embedding reduced to the rows that differ from `base`."""
    router = dict(router)
    emb = router.pop("router.embed")
    rows = (emb.half().float() != base.half().float()).any(dim=1).nonzero().squeeze(1)
    router["router.embed_rows"] = rows.to(torch.int32)
    router["router.embed_values"] = emb[rows]
    return {k: v if v.dtype == torch.int32 else v.half().contiguous() for k, v in router.items()}


def build_default(gguf_path, out_folder, progress=None, force: bool = False,
                  artifacts: Path | None = None) -> Path:
    """GGUF + shipped masks and router -> refit (+ trained deltas) -> MoE folder (atomic).

    `progress`: None or True shows a tqdm bar for the refit (it takes minutes), False hides it,
    a registry Progress callable `(stage, fraction)` gets the refit's progress too."""
    p = prepare(gguf_path, artifacts, progress)
    src, layers, router = p["src"], p["layers"], p["router"]
    if (src / DELTAS).exists():
        t = load_file(str(src / DELTAS))
        Deltas.from_tensors({k: v for k, v in t.items() if not k.startswith("router.")}, layers,
                            src / DELTAS).merge_into(layers)
        if any(k.startswith("router.") for k in t):  # the fine-tuning also tuned the router
            router = _router(src, p["moe"].router, p["moe"], p["config"].num_layers,
                             p["dense"].tensors, DELTAS)
    config = dataclasses.replace(p["config"], moe=p["moe"])
    prov = {**p["prov"], "built_from": str(gguf_path), "artifacts_sha256": artifacts_digest(src)}
    return write_moe_folder(out_folder, config, p["bb"], layers, router.state_tensors(),
                            p["masks"], p["tok"], p["dense"].chat_template, prov, force)


def prepare(gguf_path, artifacts: Path | None = None, progress=None) -> dict:
    """The refitted default before any deltas: checks the GGUF against the artifacts, slices
    the experts by the shipped masks and refits them routed by the shipped router."""
    src = Path(artifacts) if artifacts else Path(str(resources.files("edge_readme") / "artifacts"))
    meta = json.loads((src / META).read_text())
    digest = sha256_file(Path(gguf_path))
    if digest != meta["gguf_sha256"]:
        raise ModelFormatError(f"{gguf_path}: sha256 {digest} differs from {meta['gguf_sha256']}, "
                               "the GGUF the default MoE artifacts were made from; pull that file")
    dense = load_model(gguf_path)
    moe = MoEConfig.from_dict(meta["moe"])
    c, prov = dense.config, meta["refactor"]
    masks = Masks.from_tensors(load_file(str(src / MASKS)), c.num_layers, moe.num_experts)
    router = _router(src, moe.router, moe, c.num_layers, dense.tensors)
    tok = Tokenizer(dense.tokenizer, dense.chat_template)
    docs = load_docs(None, prov.get("calibration_domains"))  # None: every builtin domain
    cal = tokenize(docs, tok.encode, prov["seq_len"], prov["sequences_per_domain"], 0)
    bb = fn.Backbone.create(c, dense.tensors, prov["seq_len"])
    layers = [fn.slice_layer(bb, i, masks.shared[i], masks.experts[i]) for i in range(c.num_layers)]
    seqs = cal.train_tensor()
    if prov.get("recovery") == "refit":
        with torch.inference_mode():
            route = targets.as_path(router.forward_batch(seqs).argmax(-1), c.num_layers,
                                    moe.routing)
        callback = (lambda f: progress("refit", f)) if callable(progress) else None
        recovery.refit(bb, layers, seqs, route, progress=progress is not False,
                       callback=callback)
    return {"src": src, "meta": meta, "dense": dense, "moe": moe, "config": c, "prov": prov,
            "masks": masks, "router": router, "tok": tok, "bb": bb, "layers": layers}


def _router(src: Path, cfg: RouterConfig, moe: MoEConfig, layers: int, tensors,
            name: str = ROUTER) -> Router:
    t = {k: v.float() if v.is_floating_point() else v for k, v in
         load_file(str(src / name)).items() if k.startswith("router.")}
    base = Router.init_from_embedding(cfg, tensors["model.embed_tokens.weight"],
                                      moe.num_experts, layers, moe.routing)
    emb = base.embed.detach().clone()
    emb[t.pop("router.embed_rows").long()] = t.pop("router.embed_values")
    t["router.embed"] = emb
    return Router.from_tensors(cfg, moe.num_experts, layers, moe.routing, t)
