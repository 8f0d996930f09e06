"""Refactor a registry GGUF into a Read-ME MoE and shrink it into the small artifacts that
`edge-readme pull NAME-readme` rebuilds it from (masks, router, settings; the refit runs at pull
time on the builtin calibration corpus).

    python tools/make_readme_artifacts.py qwen2.5-coder-0.5b \\
        edge_readme/artifacts/qwen2.5-coder-0.5b --domains code,docs,conversation \\
        --active-fraction 0.75 --seq-len 128 --sequences-per-domain 12

Prints the refactoring report (router accuracy, parameters, seconds) as one JSON line.
"""

import json
import tempfile
import time
from pathlib import Path

import click

from edge_readme.refactor.build_default import META, export_artifacts
from edge_readme.refactor.pipeline import refactor
from edge_readme.registry import resolve


@click.command()
@click.argument("model")
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--domains", default="code,docs,conversation", show_default=True)
@click.option("--active-fraction", default=0.75, show_default=True)
@click.option("--seq-len", default=128, show_default=True)
@click.option("--sequences-per-domain", default=12, show_default=True)
@click.option("--router-steps", default=400, show_default=True)
@click.option("--allocation", type=click.Choice(["sensitivity", "uniform"]), default="uniform",
              show_default=True, help="sensitivity probes every layer (L extra passes)")
def main(model, dest, domains, active_fraction, seq_len, sequences_per_domain, router_steps,
         allocation):
    gguf = resolve(model)
    names = [d for d in domains.split(",") if d]
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="readme-artifacts-") as tmp:
        report = refactor(gguf, Path(tmp) / "moe", domains=names, active_fraction=active_fraction,
                          seq_len=seq_len, sequences_per_domain=sequences_per_domain,
                          router_steps=router_steps, allocation=allocation)
        export_artifacts(Path(tmp) / "moe", gguf, Path(dest))
    meta_path = Path(dest) / META
    meta = json.loads(meta_path.read_text())
    meta["refactor"]["calibration_domains"] = names  # the pull-time refit uses the same mix
    meta_path.write_text(json.dumps(meta, indent=2))
    report["seconds"] = round(time.time() - t0)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
