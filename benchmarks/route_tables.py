"""Routed quality per domain under several route tables, without serving anything.

Each request of the Expert Router benchmark's workload (all four levels, the same seeds) is
routed by the linear router; a table maps its label to a model, and the request's quality is
that model's bits per byte on its domain, from the benchmark's quality part
(`benchmarks/results/expert_router/quality.json`). Prints, per table, the mean per domain and
the share of requests the table puts on the coder (the larger, slower model).

    PYTHONPATH=. python benchmarks/route_tables.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from expert_router import CHAT, CODER, LEVELS, MIX, workload  # noqa: E402

from edge_readme.routing import build, spec_from  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quality", type=Path,
                    default=ROOT / "benchmarks/results/expert_router/quality.json")
    a = ap.parse_args()
    bpb = json.loads(a.quality.read_text())["bits_per_byte"]
    spec = spec_from([CHAT, CODER], "linear")
    router = build(spec)
    reqs = [r for users, per in LEVELS for r in workload(users * per, seed=users)]
    labels = [(dom, router.choose(text).label) for text, dom in reqs]
    tables = {"generalist (SmolLM2 only)": {k: CHAT for k in spec.table},
              "default": dict(spec.table),
              "docs -> coder too": {**spec.table, "docs": CODER},
              "everything -> coder": {k: CODER for k in spec.table}}
    print(f"{len(labels)} requests; | table | " + " | ".join(MIX) + " | on the coder |")
    for name, table in tables.items():
        row = [statistics.fmean(bpb[table[lab]][d] for dd, lab in labels if dd == d)
               for d in MIX]
        share = sum(table[lab] == CODER for _, lab in labels) / len(labels)
        print(f"| {name} | " + " | ".join(f"{x:.4f}" for x in row) + f" | {share:.2f} |")


if __name__ == "__main__":
    main()
