"""Train low-rank deltas for the default MoE on top of the shipped masks, router and refit.

The short path to `default_deltas.safetensors`: no calibration passes, no allocation probe, no
router distillation; it rebuilds exactly what a pull rebuilds (`build_default.prepare`: slice +
refit routed by the shipped router), distils the dense model into rank-R corrections of every
expert (the router frozen), and after each of the five rounds writes a complete artifacts folder
to --out (the shipped masks, router and settings plus the deltas so far), so a stopped run still
leaves usable artifacts. `--eval` prints the held-out perplexity ratio on the README table's
untouched split (held-out sequences 5-20 of each domain) before and after.

    python tools/train_deltas.py GGUF --out /tmp/art --steps 200 --rank 4 --eval
"""

import json
import math
import shutil
import time
from pathlib import Path

import click
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from edge_readme.refactor import build_default as bd
from edge_readme.refactor import functional as fn
from edge_readme.refactor import targets, train
from edge_readme.refactor.delta import Deltas
from edge_readme.refactor.pipeline import DELTA_LR, finetune_sequences, load_docs, tokenize


@torch.inference_mode()
def heldout_ratio(p, offset: int, count: int) -> dict[str, float]:
    eb = p["bb"].to(fn.fast_dtype())
    cal = tokenize(load_docs(None), p["tok"].encode, p["prov"]["seq_len"], 1, offset + count)
    out = {}
    for name, seqs in cal.heldout.items():
        ids = torch.tensor(seqs[offset:])
        route = targets.as_path(p["router"].forward_batch(ids).argmax(-1),
                                p["config"].num_layers, p["router"].routing)
        moe = fn.mean_nll(fn.moe_forward(eb, [x.to(eb.dtype) for x in p["layers"]], ids, route),
                          ids)
        dense = fn.mean_nll(fn.dense_forward(eb, ids), ids)
        out[name] = round(math.exp(moe - dense), 3)
    out["mean"] = round(sum(out.values()) / len(out), 3)
    return out


def write(p, deltas: Deltas, out: Path, info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in (bd.MASKS, bd.ROUTER):
        shutil.copyfile(p["src"] / name, out / name)
    meta = {**p["meta"], "refactor": {**p["prov"], "delta": info}}
    tmp = out / (bd.DELTAS + ".tmp")
    save_file(deltas.to_tensors(), str(tmp))
    tmp.replace(out / bd.DELTAS)
    (out / bd.META).write_text(json.dumps(meta, indent=2))


@click.command()
@click.argument("gguf")
@click.option("--artifacts", default=None, help="shipped artifacts to start from (default: the "
              "package's); they must have no deltas yet")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--steps", default=200)
@click.option("--rank", default=4)
@click.option("--lr", default=DELTA_LR)
@click.option("--minutes", default=0.0, help="stop after the round that passes this (0: no cap)")
@click.option("--eval", "do_eval", is_flag=True)
@click.option("--eval-offset", default=4)
@click.option("--eval-sequences", default=16)
def main(gguf, artifacts, out, steps, rank, lr, minutes, do_eval, eval_offset, eval_sequences):
    t0 = time.time()
    p = bd.prepare(gguf, artifacts and Path(artifacts))
    if (p["src"] / bd.DELTAS).exists():
        raise click.UsageError(f"{p['src']} already has {bd.DELTAS}; start from refit artifacts")
    print(json.dumps({"prepare_s": round(time.time() - t0)}), flush=True)
    if do_eval:
        print(json.dumps({"recovery": "refit", "ratio": heldout_ratio(p, eval_offset,
                                                                      eval_sequences)}),
              flush=True)
    torch.manual_seed(0)
    expert_seqs = finetune_sequences(load_docs(None), p["tok"].encode,
                                     min(p["prov"]["seq_len"], 128))
    deltas = Deltas.create(p["layers"], rank)
    rounds, done, t1 = train.ROUNDS, 0, time.time()
    with tqdm(total=steps, desc="deltas", unit="step") as bar:
        for r in range(rounds):
            n = steps // rounds + (1 if r < steps % rounds else 0)
            losses = train.train_experts(p["bb"], p["layers"], p["router"], expert_seqs, n,
                                         lr * 0.5 ** r, 4, 13 * r, bar, done, deltas)
            done += n
            info = {"rank": rank, "lr": lr, "steps": done, "train_s": round(time.time() - t1),
                    "kl_last": round(sum(losses[-10:]) / len(losses[-10:]), 4),
                    "router": "shipped (frozen)"}
            write(p, deltas, Path(out), info)
            print(json.dumps({"round": r, **info}), flush=True)
            if minutes and time.time() - t1 > minutes * 60:
                break
    if do_eval:
        deltas.merge_into(p["layers"])
        print(json.dumps({"recovery": f"refit+delta{rank}x{done}",
                          "ratio": heldout_ratio(p, eval_offset, eval_sequences)}), flush=True)


if __name__ == "__main__":
    main()
