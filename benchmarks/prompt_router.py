"""Prompt-router accuracy and latency on the held-out prompts of the built-in routing corpus.

For each router kind (TF-IDF linear, TF-IDF + k-means as in the Expert Router paper, the Read-ME
domain router of each --readme model, and seeded random choice), prints the share of held-out
prompts of each domain (code, chat, docs) given the right label, and the classifier's per-prompt
latency (mean and p95 over --repeat passes). Random is scored on labels: a uniform guess among
the three. Writes the figures as JSON to --out.

    PYTHONPATH=. python benchmarks/prompt_router.py
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import numpy as np

from edge_readme.registry import resolve
from edge_readme.routing import DOMAINS, load_corpus, train
from edge_readme.routing.readme_domains import from_model


class _RandomLabel:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def predict(self, text: str) -> str:
        return self.rng.choice(DOMAINS)


def measure(clf, rows: list[tuple[str, str]], repeat: int) -> dict:
    hits: dict[str, list[bool]] = {d: [] for d in DOMAINS}
    times = []
    for r in range(repeat):
        for text, dom in rows:
            t0 = time.perf_counter()
            label = clf.predict(text)
            times.append(time.perf_counter() - t0)
            if r == 0:
                hits[dom].append(label == dom)
    acc = {d: round(float(np.mean(v)), 3) for d, v in hits.items()}
    acc["all"] = round(float(np.mean([x for v in hits.values() for x in v])), 3)
    return {"accuracy": acc, "latency_ms": {"mean": round(1e3 * float(np.mean(times)), 3),
                                            "p95": round(1e3 * float(np.percentile(times, 95)),
                                                         3)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readme", action="append",
                    default=None, help="Read-ME models whose routers to score (repeatable)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/prompt_router.json"))
    a = ap.parse_args()
    readme = a.readme or ["smollm2-135m-readme", "qwen2.5-coder-0.5b-readme"]
    test = load_corpus("test")
    counts = {d: sum(1 for _, x in test if x == d) for d in DOMAINS}
    kinds = {"linear": train("linear", a.seed), "kmeans": train("kmeans", a.seed)}
    for name in readme:
        kinds[f"readme:{name}"] = from_model(resolve(name), DOMAINS)
    kinds["random"] = _RandomLabel(a.seed)
    report = {"held_out_prompts": counts, "cpu": _cpu(), "kinds": {}}
    print(f"held-out prompts per domain: {counts}")
    print(f"{'kind':36s} {'code':>6s} {'chat':>6s} {'docs':>6s} {'all':>6s} {'ms mean':>8s} "
          f"{'ms p95':>8s}")
    for kind, clf in kinds.items():
        r = measure(clf, test, a.repeat)
        report["kinds"][kind] = r
        acc, lat = r["accuracy"], r["latency_ms"]
        print(f"{kind:36s} {acc['code']:6.2f} {acc['chat']:6.2f} {acc['docs']:6.2f} "
              f"{acc['all']:6.2f} {lat['mean']:8.3f} {lat['p95']:8.3f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(a.out)
    print(f"wrote {a.out}")


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
