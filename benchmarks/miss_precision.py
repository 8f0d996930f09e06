"""--miss-precision at a tight budget, cold storage: decode speed, fire rate, perplexity cost.

    python benchmarks/miss_precision.py [--model smollm2-135m-readme] [--share 0.25] [--reps 3]

Speed: decode tok/s of prefetch + Belady at `share` of the expert slots on top of the fixed
part, cold storage (O_DIRECT), exact and with q2 / q3 copies (same slots, the copies on top),
and exact again at the q2 engine's whole budget (the copies' bytes spent on more slots
instead). Repetitions are interleaved (benchmarks/offload.py's way); ratios are within one run.
Quality: held-out perplexity, teacher-forced one token a step through the runtime (so decode
steps miss, and fire, as they do in generation), for the exact and low-bit engines, and the
bound where every routed expert runs from its copy.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from edge_readme import Engine  # noqa: E402
from edge_readme.bench import builtin_prompts, cpu_summary, write_json  # noqa: E402
from edge_readme.runtime import dry_run_plan  # noqa: E402

MODES = {"prefetch": {"policy": "belady", "prefetch": True, "speculate": 4},
         "on-demand": {"policy": "lru", "prefetch": False, "speculate": 0}}




def configs(model: str, base: dict, share: float, precisions: list[str]) -> list[dict]:
    plan = dry_run_plan(model, base)
    keys, slot = plan["expert_keys"], plan["slot_bytes"]
    n = max(1, int(share * keys))
    exact = plan["minimum_bytes"] + (n - 1) * slot
    low = {p: dry_run_plan(model, {**base, "miss_precision": p})["minimum_bytes"]
           + (n - 1) * slot for p in precisions}
    ref = f"{share:.0%} exact"
    out = [{"name": "all-resident", "budget": None, "miss_precision": None, "mode": "prefetch",
            "ref": ref},
           {"name": ref, "budget": exact, "miss_precision": None, "mode": "prefetch",
            "ref": ref}]
    out += [{"name": f"{share:.0%} +{p}", "budget": low[p], "miss_precision": p,
             "mode": "prefetch", "ref": ref} for p in precisions]
    if precisions:  # exact, given the first low-bit engine's whole budget; and on demand
        p = precisions[0]
        out.append({"name": f"exact at +{p} budget", "budget": low[p], "miss_precision": None,
                    "mode": "prefetch", "ref": ref})
        od = f"{share:.0%} on-demand exact"
        out.append({"name": od, "budget": exact, "miss_precision": None, "mode": "on-demand",
                    "ref": od})
        out.append({"name": f"{share:.0%} on-demand +{p}", "budget": low[p],
                    "miss_precision": p, "mode": "on-demand", "ref": od})
    return out


def measure(engine: Engine, prompt) -> dict:
    c0, t0 = engine.runtime.cache.stats.to_json(), engine.totals
    d0, s0 = t0.decode_tokens, t0.decode_seconds
    engine.generate(prompt.text, max_tokens=prompt.max_tokens)
    c1, t1 = engine.runtime.cache.stats.to_json(), engine.totals
    out = {k: c1[k] - c0[k] for k in ("hits", "misses", "low_precision", "stall_seconds")}
    out.update(decode_tokens=t1.decode_tokens - d0, decode_seconds=t1.decode_seconds - s0)
    return out


def speed(model: str, base: dict, cfgs: list[dict], reps: int, prompts: list) -> list[dict]:
    with contextlib.ExitStack() as stack:
        engines, load_s = [], []
        for c in cfgs:
            cold = c["budget"] is not None
            t = time.perf_counter()
            engines.append(stack.enter_context(Engine.load(
                model, memory_budget=c["budget"], cold=cold, miss_precision=c["miss_precision"],
                **MODES[c["mode"]], **base)))
            load_s.append(round(time.perf_counter() - t, 2))  # with --miss-precision: copies
        for e in engines:
            e.generate(prompts[-1].text, max_tokens=4)  # warm-up: torch, and the cache
        runs = []
        for rep in range(reps):
            sums = [dict.fromkeys(("hits", "misses", "low_precision", "stall_seconds",
                                   "decode_tokens", "decode_seconds"), 0) for _ in cfgs]
            for k, prompt in enumerate(prompts[:-1]):
                shift = (rep * len(prompts) + k) % len(cfgs)
                for i in list(range(len(cfgs)))[shift:] + list(range(shift)):
                    for key, v in measure(engines[i], prompt).items():
                        sums[i][key] += v
            runs.append(sums)
            print(f"rep {rep + 1}/{reps}: " + ", ".join(
                f"{c['name']} {s['decode_tokens'] / s['decode_seconds']:.2f}"
                for c, s in zip(cfgs, sums)), file=sys.stderr)
        slots = [e.runtime.plan.slots for e in engines]
        resident = [e.runtime.resident_bytes() for e in engines]
    rows = []
    names = [c["name"] for c in cfgs]
    for i, c in enumerate(cfgs):
        tps = [r[i]["decode_tokens"] / r[i]["decode_seconds"] for r in runs]
        j = names.index(c["ref"])
        vs_exact = [tps_i / (r[j]["decode_tokens"] / r[j]["decode_seconds"])
                    for tps_i, r in zip(tps, runs)]
        tot = {k: sum(r[i][k] for r in runs) for k in runs[0][i]}
        uses = tot["hits"] + tot["misses"] + tot["low_precision"]
        rows.append({**c, "slots": slots[i], "resident_bytes": resident[i],
                     "load_seconds": load_s[i],
                     "decode_tokens_per_s": round(statistics.median(tps), 3),
                     "reps": [round(x, 3) for x in tps],
                     "vs_exact": round(statistics.median(vs_exact), 3),
                     "fire_rate": round(tot["low_precision"] / uses, 4) if uses else 0.0,
                     "stall_share": round(tot["stall_seconds"] / tot["decode_seconds"], 4)})
    return rows


def heldout(tok_encode, seq_len: int, per_domain: int) -> list[list[int]]:
    from edge_readme.refactor.corpus import by_domain, load_builtin, token_batches

    seqs = []
    for docs in by_domain(load_builtin("heldout")).values():
        seqs += token_batches(docs, tok_encode, seq_len, per_domain)
    return seqs


class EveryUseLowBit:
    """The bound: every routed expert use computed from its low-bit copy."""

    def __init__(self, copies):
        self.copies = copies

    def get(self, layer: int, expert: int):
        return contextlib.nullcontext(self.copies.weights((layer, expert)))


def perplexity(model: str, base: dict, cfg: dict, seqs: list[list[int]], prefix: int,
               bound: bool = False) -> dict:
    """Teacher-forced: `prefix` tokens of prefill, then one token a decode step."""
    from edge_readme.loader import load_model
    from edge_readme.registry import resolve
    from edge_readme.runtime import Runtime, RuntimeOptions

    opts = RuntimeOptions(memory_budget=cfg["budget"], cold=cfg["budget"] is not None,
                          miss_precision=cfg["miss_precision"], **MODES[cfg["mode"]], **base)
    rt = Runtime(load_model(resolve(model)), opts)
    try:
        if bound:
            rt.model.attach_experts(EveryUseLowBit(rt.miss.copies))
        nll, n = 0.0, 0
        for s in seqs:
            rt.reset()
            logits = rt.step([(0, s[:prefix])])[0]
            for i in range(prefix, len(s)):
                nll += float(F.cross_entropy(logits.float()[None], torch.tensor([s[i]])))
                n += 1
                if i + 1 < len(s):
                    logits = rt.step([(0, [s[i]])], speculate=True)[0]
        st = rt.cache.stats
        uses = st.hits + st.misses + st.low_precision
        return {"name": cfg["name"] + (" (every use low-bit)" if bound else ""),
                "ppl": round(math.exp(nll / n), 4), "tokens": n,
                "fire_rate": 1.0 if bound else round(st.low_precision / uses, 4)}
    finally:
        rt.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-readme")
    ap.add_argument("--share", type=float, default=0.25, help="Expert slots, share of all.")
    ap.add_argument("--precisions", default="q2,q3")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ppl-seqs", type=int, default=1, help="Held-out sequences per domain.")
    ap.add_argument("--ppl-len", type=int, default=160)
    ap.add_argument("--skip", choices=["speed", "ppl"], default=None)
    ap.add_argument("--out", type=Path, default=Path("results/miss_precision"))
    a = ap.parse_args(argv)
    base = {"device": "cpu", "context_length": 512, "threads": a.threads}
    precisions = [p for p in a.precisions.split(",") if p]
    cfgs = configs(a.model, base, a.share, precisions)
    start = time.perf_counter()
    report = {"model": a.model, "cpu": cpu_summary()["model"], "cpu_count": os.cpu_count(),
              "threads": torch.get_num_threads() if a.threads is None else a.threads,
              "share": a.share, "configs": cfgs}
    a.out.mkdir(parents=True, exist_ok=True)
    if a.skip != "speed":
        prompts = builtin_prompts(per_domain=1, max_tokens=a.tokens)[: a.prompts + 1]
        rows = speed(a.model, base, cfgs, a.reps, prompts)
        report["speed"] = rows
        for r in rows:
            print(f"{r['name']:>24}  slots {r['slots']:>3}  "
                  f"resident {r['resident_bytes'] / 2**20:7.1f} MiB  "
                  f"{r['decode_tokens_per_s']:7.2f} tok/s  x{r['vs_exact']:.2f} {r['ref']}  "
                  f"fires {r['fire_rate']:.1%}  stall/decode {r['stall_share']:.0%}")
        write_json(report, a.out / "miss_precision.json")
    if a.skip != "ppl":
        from edge_readme.loader import load_model
        from edge_readme.registry import resolve
        from edge_readme.tokenizer import Tokenizer

        loaded = load_model(resolve(a.model))
        tok = Tokenizer(loaded.tokenizer, loaded.chat_template)
        del loaded
        seqs = heldout(tok.encode, a.ppl_len, a.ppl_seqs)
        prefix = 32
        low = [c for c in cfgs if c["miss_precision"]]
        quality = [perplexity(a.model, base, c, seqs, prefix) for c in [cfgs[1]] + low]
        quality += [perplexity(a.model, base, c, seqs, prefix, bound=True)
                    for c in low if c["mode"] == "prefetch"]
        ref = quality[0]["ppl"]
        for q in quality:
            q["ratio_vs_exact"] = round(q["ppl"] / ref, 4)
            print(f"{q['name']:>40}  ppl {q['ppl']:8.3f}  x{q['ratio_vs_exact']:.4f}  "
                  f"fires {q['fire_rate']:.1%}  ({q['tokens']} tokens)")
        report["quality"] = {"sequences": len(seqs), "seq_len": a.ppl_len, "prefix": prefix,
                             "rows": quality}
    report["seconds"] = round(time.perf_counter() - start, 1)
    write_json(report, a.out / "miss_precision.json")
    print(f"wrote {a.out / 'miss_precision.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
