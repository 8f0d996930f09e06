"""Decode speed and memory of several models side by side: the speed and memory columns of the
README's Pareto table (active fraction against question score and perplexity).

Each model is loaded once (q4, one thread unless --threads) and decodes the same greedy prompts
in interleaved rounds, so every model meets the same background load; the ratio to the first
model is the figure to read. Memory is the runtime's own plan: the minimum budget and the
all-resident bytes (`generate --dry-run`), at the same context length.

    python benchmarks/pareto.py --models smollm2-135m,smollm2-135m-readme,/path/to/moe-0.9 \
        --out pareto.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tqdm.auto import tqdm

from edge_readme.bench import cpu_summary

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at",
           "The three primary colors are"]




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", required=True, help="comma-separated registry names or folders")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--context-length", type=int, default=2048)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    from edge_readme import Engine
    from edge_readme.runtime import dry_run_plan

    names = [m for m in a.models.split(",") if m]
    engines = {m: Engine.load(m, threads=a.threads, context_length=a.context_length)
               for m in tqdm(names, desc="load", unit="model")}
    speeds: dict[str, list[float]] = {m: [] for m in names}
    with tqdm(total=a.rounds * len(names) * len(PROMPTS), desc="decode", unit="run") as bar:
        for _ in range(a.rounds):
            for m in names:  # interleaved: each round runs every model once
                for p in PROMPTS:
                    out = engines[m].generate(p, max_tokens=a.tokens, temperature=0.0,
                                              ignore_eos=True)
                    speeds[m].append(out.stats["decode_tokens_per_s"])
                    bar.update()
    rows = []
    for m in names:
        plan = dry_run_plan(m, {"context_length": a.context_length, "device": "cpu"})
        rows.append({"model": m, "decode_tok_s": round(statistics.median(speeds[m]), 2),
                     "minimum_mib": round(plan["minimum_bytes"] / 2**20, 1),
                     "all_resident_mib": round(plan["all_resident_bytes"] / 2**20, 1)})
    base = rows[0]["decode_tok_s"]
    for r in rows:
        r["speed_vs_first"] = round(r["decode_tok_s"] / base, 3)
    report = {"cpu": cpu_summary()["model"], "threads": a.threads, "tokens": a.tokens,
              "context_length": a.context_length, "rows": rows}
    print(json.dumps(report, indent=2))
    if a.out:
        tmp = Path(a.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(a.out)
    for e in engines.values():
        e.close()


if __name__ == "__main__":
    main()
