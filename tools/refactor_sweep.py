"""Held-out perplexity ratio MoE/dense against active fraction, recovery none vs refit.

Loads the model and calibration statistics once (cached), then per active fraction: masks,
router distillation, and both recoveries, evaluated with the functional forward on the builtin
held-out split (router routing). Prints one JSON line per (fraction, recovery).

    python tools/refactor_sweep.py /tmp/setup/model/model.gguf --fractions 0.5,0.75
"""

import json
import math
import time

import click
import torch
import torch.nn.functional as F

from edge_readme.config import RouterConfig
from edge_readme.loader import load_model
from edge_readme.refactor import calibrate, recovery, targets, train
from edge_readme.refactor import functional as fn
from edge_readme.refactor.masks import build_masks
from edge_readme.refactor.pipeline import load_docs, moe_params, tokenize
from edge_readme.router import Router
from edge_readme.tokenizer import Tokenizer


@torch.no_grad()
def ratios(bb, layers, router, cal):
    out = {}
    for name in cal.names:
        ids = torch.tensor(cal.heldout[name])
        route = targets.as_path(router.forward_batch(ids).argmax(-1), bb.config.num_layers,
                                router.routing)
        nd = F.cross_entropy(fn.dense_forward(bb, ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        nm = F.cross_entropy(fn.moe_forward(bb, layers, ids, route)[:, :-1].flatten(0, 1),
                             ids[:, 1:].flatten())
        out[name] = round(math.exp(float(nm - nd)), 3)
    return out


@click.command()
@click.argument("model")
@click.option("--fractions", default="0.5,0.625,0.75,0.9")
@click.option("--seq-len", default=256)
@click.option("--per-domain", default=16)
@click.option("--router-steps", default=400)
def main(model, fractions, seq_len, per_domain, router_steps):
    torch.manual_seed(0)
    loaded = load_model(model)
    tok = Tokenizer(loaded.tokenizer, loaded.chat_template)
    cal = tokenize(load_docs(None), tok.encode, seq_len, per_domain, 4)
    bb = fn.Backbone.create(loaded.config, loaded.tensors, seq_len)
    stats = calibrate.domain_stats(bb, cal.train, calibrate.model_fingerprint(model),
                                   calibrate.default_cache_dir())
    seqs = cal.train_tensor()
    for frac in [float(f) for f in fractions.split(",")]:
        t0 = time.time()
        masks = build_masks(stats, frac)
        scores = targets.expert_scores(bb, seqs.tolist(), masks)
        router = Router.init_from_embedding(RouterConfig(), bb.tensors["model.embed_tokens.weight"],
                                            masks.num_experts, bb.config.num_layers)
        train.train_router(router, seqs, targets.soft_target(scores, "global"), router_steps)
        held = cal.heldout_tensor()
        hs = targets.expert_scores(bb, held.tolist(), masks, desc="held-out targets")
        acc = train.router_accuracy(router, held, targets.oracle(hs, "global"))
        layers = [fn.slice_layer(bb, i, masks.shared[i], masks.experts[i])
                  for i in range(bb.config.num_layers)]
        p = moe_params(bb.config, masks, router)
        row = {"fraction": frac, "router_accuracy": round(acc, 3), "params": p}
        print(json.dumps({**row, "recovery": "none", "ratio": ratios(bb, layers, router, cal),
                          "s": round(time.time() - t0)}), flush=True)
        t1 = time.time()
        route = targets.as_path(router.forward_batch(seqs).argmax(-1), bb.config.num_layers,
                                "global")
        recovery.refit(bb, layers, seqs, route)
        print(json.dumps({**row, "recovery": "refit", "ratio": ratios(bb, layers, router, cal),
                          "refit_s": round(time.time() - t1)}), flush=True)


if __name__ == "__main__":
    main()
