"""Expert slots that follow traffic: two Read-ME models under one budget, all traffic on one.

Loads a chat model and a coding model with one `--budget` split between them as `serve --route`
splits it (each model's minimum, then the rest by expert bytes), then sends the same seeded code
prompts to the coding model in two setups loaded side by side, taking turns prompt by prompt:
- fixed: the start split stays;
- rebalanced: a `fleet.Rebalancer` moves the idle chat model's slots to the coding model.
Reports the coding model's decode tokens/s, expert hit ratio and bytes read for each, and checks
that both give the same tokens (offloading is exact). Expert reads bypass the page cache
(`cold`), as on a machine whose RAM is taken by the budget.

    python benchmarks/rebalance.py --chat smollm2-135m-readme --coder qwen2.5-coder-0.5b-readme
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "# Python: read a CSV file and print the sum of its second column\nimport csv\n",
    "def is_prime(n: int) -> bool:\n",
    "class Stack:\n    \"\"\"A stack backed by a list.\"\"\"\n",
    "// C: reverse a string in place\nvoid reverse(char *s) {\n",
    "SELECT name, COUNT(*) FROM orders\n",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chat", default="smollm2-135m-readme")
    ap.add_argument("--coder", default="qwen2.5-coder-0.5b-readme")
    ap.add_argument("--expert-share", type=float, default=0.4,
                    help="bytes beyond both minimums, as a share of both models' expert bytes")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--context-length", type=int, default=512)
    ap.add_argument("--out", default="results/rebalance.json")
    a = ap.parse_args()

    from tqdm import tqdm

    from edge_readme import Engine
    from edge_readme.bench import cpu_summary
    from edge_readme.routing import fleet

    opts = {"device": "cpu", "context_length": a.context_length, "threads": a.threads,
            "cold": True}
    names = [a.chat, a.coder]
    needs = fleet.measure(names, opts)
    experts = sum(n.keys * n.slot_bytes for n in needs)
    budget = sum(n.minimum_bytes for n in needs) + int(a.expert_share * experts)
    start = fleet.split(budget, needs)
    print(f"budget {budget / 2**20:.1f} MiB; start slots {fleet.slots(start, needs)}",
          file=sys.stderr)
    setups = {}
    for mode in ("fixed", "rebalanced"):
        engines = {m: Engine.load(m, memory_budget=start[m], **opts) for m in names}
        if mode == "rebalanced":  # what the server's counters show while the coder serves
            inflight = {a.chat: 0, a.coder: 1}
            r = fleet.Rebalancer(budget, needs, dict(start), lambda: inflight,
                                 lambda m, b, engines=engines: engines[m].set_memory_budget(b))
            r.tick()
        cache = engines[a.coder].runtime.cache
        setups[mode] = {"engines": engines, "before": cache.stats.to_json(), "tokens": [],
                        "n": 0, "s": 0.0}
    for _ in tqdm(range(a.rounds), desc="rounds", file=sys.stderr):
        for p in PROMPTS:  # interleaved: the two setups take turns, prompt by prompt
            for st in setups.values():
                res = st["engines"][a.coder].generate(p, max_tokens=a.tokens, temperature=0.0,
                                                      ignore_eos=True)
                st["tokens"].append(list(res.token_ids))
                st["n"] += len(res.token_ids) - 1
                st["s"] += (len(res.token_ids) - 1) / res.stats["decode_tokens_per_s"]
    runs = {}
    for mode, st in setups.items():
        engines = st["engines"]
        after, before = engines[a.coder].runtime.cache.stats.to_json(), st["before"]
        hits = after["hits"] - before["hits"]
        misses = after["misses"] - before["misses"]
        runs[mode] = {"slots": {m: e.runtime.plan.slots for m, e in engines.items()},
                      "decode_tok_s": round(st["n"] / st["s"], 2),
                      "hit_ratio": round(hits / max(1, hits + misses), 4),
                      "bytes_read": after["bytes_read"] - before["bytes_read"],
                      "resident_bytes": sum(e.runtime.resident_bytes()
                                            for e in engines.values()),
                      "tokens": st["tokens"]}
        for e in engines.values():
            e.close()
    same = runs["fixed"]["tokens"] == runs["rebalanced"]["tokens"]
    report = {"cpu": cpu_summary(), "budget_bytes": budget, "threads": a.threads,
              "chat": a.chat, "coder": a.coder, "same_tokens": same,
              "speedup": round(runs["rebalanced"]["decode_tok_s"]
                               / runs["fixed"]["decode_tok_s"], 3),
              **{k: {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in runs.items()}}
    out_path = Path(a.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out_path)
    print(json.dumps(report, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
