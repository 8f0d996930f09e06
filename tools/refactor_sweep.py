"""Held-out perplexity ratio MoE/dense against active fraction, recovery none vs refit.

One dense pass collects the calibration statistics and every token's router-target codes (train
and held-out); then per active fraction: masks, router distillation, router accuracy against the
oracle, and both recoveries, evaluated with the functional forward on the builtin held-out split
under router routing; `--finetune-steps N` adds a timed CPU distillation after the refit. Prints
one JSON line per (fraction, recovery).

    python tools/refactor_sweep.py /tmp/setup/model/model.gguf --fractions 0.5,0.75
"""

import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path

import click
import torch

from edge_readme.config import MoEConfig, RouterConfig
from edge_readme.loader import load_model
from edge_readme.refactor import allocate, calibrate, recovery, targets, train
from edge_readme.refactor import functional as fn
from edge_readme.refactor.build_default import export_artifacts
from edge_readme.refactor.delta import FOLDER_DELTAS, Deltas
from edge_readme.refactor.masks import build_masks
from edge_readme.refactor.pipeline import (
    DELTA_LR,
    finetune_sequences,
    load_docs,
    moe_params,
    tokenize,
)
from edge_readme.refactor.writer import write_moe_folder
from edge_readme.router import Router
from edge_readme.tokenizer import Tokenizer


@torch.inference_mode()
def moe_nll(eb, layers, router, cal) -> dict[str, float]:
    out = {}
    for name in cal.names:
        ids = torch.tensor(cal.heldout[name])
        route = targets.as_path(router.forward_batch(ids).argmax(-1), eb.config.num_layers,
                                router.routing)
        logits = fn.moe_forward(eb, [x.to(eb.dtype) for x in layers], ids, route)
        out[name] = fn.mean_nll(logits, ids)
    return out


def ratios(moe: dict[str, float], dense: dict[str, float]) -> dict[str, float]:
    r = {n: round(math.exp(moe[n] - dense[n]), 3) for n in dense}
    r["mean"] = round(sum(r.values()) / len(dense), 3)
    return r


def step_seconds(bb, layers, router, expert_seqs) -> float:
    """Seconds per expert-distillation step (batch 4 x 128 tokens), on copies of the layers."""
    copies = [fn.MoELayer(tuple(w.clone() for w in x.shared),
                          [tuple(w.clone() for w in e) for e in x.experts]) for x in layers]
    t = time.time()
    train.train_experts(bb, copies, router, expert_seqs, 3, 1e-4, 4, 0)
    return (time.time() - t) / 3


@click.command()
@click.argument("model")
@click.option("--fractions", default="0.5,0.625,0.75,0.9")
@click.option("--seq-len", default=256)
@click.option("--per-domain", default=16)
@click.option("--router-steps", default=400)
@click.option("--routing", type=click.Choice(["global", "per_layer"]), default="global")
@click.option("--allocation", type=click.Choice(["sensitivity", "uniform"]),
              default="sensitivity", help="per-layer active fractions (see allocate.py)")
@click.option("--ridge", default=recovery.RIDGE, help="of the refit (recovery.RIDGE)")
@click.option("--finetune-steps", default=0, help="after the refit, this many steps of "
              "alternating router / expert distillation (train.finetune), timed")
@click.option("--finetune-minutes", default=0.0, help="instead of --finetune-steps: as many "
              "steps as fit in this many minutes, at the speed of 3 timed expert steps")
@click.option("--delta-rank", default=0, help="train rank-R corrections (delta.py) instead of "
              "the full expert weights in the distillation")
@click.option("--delta-lr", default=DELTA_LR, help="AdamW lr of the low-rank factors")
@click.option("--export", "export_dir", default=None, type=click.Path(file_okay=False),
              help="with one fraction: write the default-MoE artifacts (masks, routers, deltas) "
                   "of the last row here (e.g. edge_readme/artifacts)")
@click.option("--eval-sequences", default=16, help="held-out sequences per domain evaluated")
@click.option("--eval-offset", default=4, help="held-out sequences skipped first: the first 4 "
              "(what `edge-readme eval` reads by default) chose the allocation exponent and ridge")
@click.option("--domains", default="", help="comma-separated builtin domains to keep (default: "
              "all), one expert each")
@click.option("--eval-dtype", type=click.Choice(["fast", "float32"]), default="fast",
              help="dtype of the evaluation forwards (fast: bfloat16 where the CPU has it)")
def main(model, fractions, seq_len, per_domain, router_steps, routing, allocation, ridge,
         finetune_steps, finetune_minutes, delta_rank, delta_lr, export_dir, eval_sequences,
         eval_offset, domains, eval_dtype):
    torch.manual_seed(0)
    loaded = load_model(model)
    tok = Tokenizer(loaded.tokenizer, loaded.chat_template)
    docs = load_docs(None, [d for d in domains.split(",") if d] or None)
    cal = tokenize(docs, tok.encode, seq_len, per_domain, eval_offset + eval_sequences)
    cal.heldout = {n: v[eval_offset:] for n, v in cal.heldout.items() if len(v) > eval_offset}
    bb = fn.Backbone.create(loaded.config, loaded.tensors, seq_len)
    fast = bb.to(fn.fast_dtype())
    eb = fast if eval_dtype == "fast" else bb
    t0 = time.time()
    stats, codes = calibrate.domain_stats(fast, cal.train, calibrate.model_fingerprint(model),
                                          calibrate.default_cache_dir(), with_codes=True)
    held = cal.heldout_tensor()
    held_codes = targets.activation_codes(fast, held.tolist(), desc="held-out targets")
    with torch.inference_mode():
        dense = {n: fn.mean_nll(fn.dense_forward(eb, torch.tensor(cal.heldout[n])),
                                torch.tensor(cal.heldout[n])) for n in cal.names}
    print(json.dumps({"pass_dtype": str(fast.dtype), "eval_dtype": str(eb.dtype),
                      "dense_ppl": {n: round(math.exp(v), 3) for n, v in dense.items()},
                      "passes_s": round(time.time() - t0)}), flush=True)
    seqs = cal.train_tensor()
    expert_seqs = finetune_sequences(docs, tok.encode)
    L = bb.config.num_layers
    costs = None
    if allocation == "sensitivity":
        costs = allocate.layer_costs(bb, fast, stats, seqs, codes, routing)
        print(json.dumps({"layer_costs": [round(c, 4) for c in costs]}), flush=True)
    for frac in [float(f) for f in fractions.split(",")]:
        t0 = time.time()
        rows = None if costs is None else allocate.allocate(costs, frac,
                                                             bb.config.intermediate_size)
        masks = build_masks(stats, frac, rows)
        soft = targets.soft_target(targets.scores_from_codes(codes, masks), routing)
        router = Router.init_from_embedding(RouterConfig(), bb.tensors["model.embed_tokens.weight"],
                                            masks.num_experts, L, routing)
        train.train_router(router, seqs, soft, router_steps)
        oracle = targets.oracle(targets.scores_from_codes(held_codes, masks), routing)
        acc = train.router_accuracy(router, held, oracle)
        layers = [fn.slice_layer(bb, i, masks.shared[i], masks.experts[i]) for i in range(L)]
        row = {"fraction": frac, "allocation": allocation, "routing": routing, "ridge": ridge,
               "router_accuracy": round(acc, 3),
               "params": moe_params(bb.config, masks, router)}
        print(json.dumps({**row, "recovery": "none",
                          "ratio": ratios(moe_nll(eb, layers, router, cal), dense),
                          "s": round(time.time() - t0)}), flush=True)
        t1 = time.time()
        with torch.inference_mode():
            route = targets.as_path(router.forward_batch(seqs).argmax(-1), L, routing)
        recovery.refit(bb, layers, seqs, route, ridge=ridge, dtype=fast.dtype)
        refit_s = round(time.time() - t1)
        print(json.dumps({**row, "recovery": "refit",
                          "ratio": ratios(moe_nll(eb, layers, router, cal), dense),
                          "refit_s": refit_s}), flush=True)
        steps = finetune_steps
        if finetune_minutes:
            steps = max(3, int(finetune_minutes * 60 / step_seconds(bb, layers, router,
                                                                    expert_seqs)))
        refit_router = {k: v.detach().clone() for k, v in router.state_tensors().items()}
        deltas = None
        if steps:
            t1 = time.time()
            deltas = Deltas.create(layers, delta_rank) if delta_rank else None
            train.finetune(bb, layers, router, seqs, soft, steps, expert_seqs=expert_seqs,
                           expert_lr=delta_lr if deltas else 1e-4, deltas=deltas)
            if deltas is not None:
                deltas.merge_into(layers)
            acc = train.router_accuracy(router, held, oracle)
            kind = f"+delta{delta_rank}" if deltas else ""
            print(json.dumps({**row, "recovery": f"refit+distill{steps}{kind}",
                              "router_accuracy": round(acc, 3),
                              "delta_mb": round(deltas.num_parameters() * 2 / 1e6, 2)
                              if deltas else None,
                              "ratio": ratios(moe_nll(eb, layers, router, cal), dense),
                              "distill_s": round(time.time() - t1)}), flush=True)
        if export_dir:
            export(model, loaded, tok, bb, layers, masks, router, refit_router, deltas, rows,
                   {"active_fraction": frac, "allocation": allocation, "routing": routing,
                    "finetune_steps": steps, "delta_rank": delta_rank, "delta_lr": delta_lr,
                    "seq_len": seq_len, "sequences_per_domain": per_domain,
                    "router_accuracy": round(acc, 3), "domains": cal.names}, Path(export_dir))


def export(model, loaded, tok, bb, layers, masks, router, refit_router, deltas, rows, info,
           dest: Path) -> None:
    """Write the MoE folder the pipeline would, then shrink it into the shipped artifacts."""
    moe = MoEConfig(num_experts=masks.num_experts, routing=info["routing"],
                    shared_sizes=tuple(len(s) for s in masks.shared), router=RouterConfig(),
                    domains=tuple(info["domains"]))
    prov = {"domains": list(moe.domains), "recovery": "refit", "layer_rows": rows,
            "params": moe_params(bb.config, masks, router), "seed": 0, "source": str(model),
            "pass_dtype": str(fn.fast_dtype()).split(".")[-1], **info}
    extra = None
    if deltas is not None:
        extra = {FOLDER_DELTAS: {**deltas.to_tensors(),
                                 **{f"refit_{k}": v.half() for k, v in refit_router.items()}}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "moe"
        write_moe_folder(folder, dataclasses.replace(loaded.config, moe=moe), bb, layers,
                         router.state_tensors(), masks, tok, loaded.chat_template, prov,
                         extra=extra)
        export_artifacts(folder, Path(model), dest)
    print(json.dumps({"exported": str(dest), "bytes": sum(
        p.stat().st_size for p in dest.iterdir())}), flush=True)


if __name__ == "__main__":
    main()
