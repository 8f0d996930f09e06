"""`edge-readme bench`: the sweep of `edge_readme.bench` from the command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .common import DEFAULT_MODEL, MISS_PRECISION, friendly


@click.command("bench")
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
              help="Registry name or Read-ME MoE folder.")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), default=None,
              help="JSONL workload: {\"prompt\": str, \"max_tokens\"?: int} per line "
                   "(default: 2 held-out prompts per builtin domain).")
@click.option("--budgets", default="25%,50%,100%", show_default=True,
              help="Expert slots on top of the fixed part (dense, KV cache, scratch): shares "
                   "of all experts' bytes like 25%, or sizes like 300MiB.")
@click.option("--policies", default="belady,lru,lfu,fifo", show_default=True,
              help="Comma list of cache policies.")
@click.option("--lookahead", "modes", default="none,path,path+spec", show_default=True,
              help="none: load on demand; path: prefetch the router's known path; path+spec: "
                   "also prefetch the likeliest next token's first layers.")
@click.option("--max-tokens", type=click.IntRange(1, 1 << 16), default=16, show_default=True,
              help="Tokens per prompt (a prompt file's max_tokens wins).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Write bench.json (and bench.png with matplotlib) here.")
@click.option("--trace", "trace_file", type=click.Path(dir_okay=False), default=None,
              help="Write the first cell's expert access trace as JSONL.")
@click.option("--device", default="auto", show_default=True)
@click.option("--weights", type=click.Choice(["q4", "q8", "bf16", "f16", "f32"]), default=None,
              help="Weight format (default: q4 on CPU, f16 on GPU).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Older spelling of the float --weights formats.")
@click.option("--threads", type=click.IntRange(1, 256), default=None)
@click.option("--context-length", type=click.IntRange(16, 1 << 20), default=1024,
              show_default=True)
@click.option("--cold", is_flag=True, help="Read experts past the OS page cache.")
@MISS_PRECISION
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@friendly
def bench_command(model: str, prompts_file: str | None, budgets: str, policies: str, modes: str,
                  max_tokens: int, out_dir: str | None, trace_file: str | None, device: str,
                  weights: str | None, dtype: str | None, threads: int | None,
                  context_length: int, cold: bool, miss_precision: str | None,
                  quiet: bool) -> None:
    """Sweep budgets x policies x lookahead; hit ratios against the offline optimum."""
    from .. import bench
    from ..cache.policies import POLICIES

    specs = bench.parse_budgets(budgets)
    pols = bench.parse_choices(policies, list(POLICIES), "--policies")
    lookahead = bench.parse_choices(modes, list(bench.LOOKAHEAD_MODES), "--lookahead")
    if prompts_file is not None:
        prompts = bench.load_prompts(prompts_file, max_tokens)
    else:
        prompts = bench.builtin_prompts(max_tokens=max_tokens)
    kw = {"device": device, "weights": weights, "dtype": dtype, "threads": threads,
          "context_length": context_length, "cold": cold, "miss_precision": miss_precision}
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    report = bench.sweep(model, prompts, specs, pols, lookahead, kw,
                         progress=not quiet and sys.stderr.isatty(), trace_path=trace_file)
    click.echo(bench.format_table(report))
    if out_dir is not None:
        bench.write_json(report, Path(out_dir) / "bench.json")
        png = Path(out_dir) / "bench.png"
        if bench.plot(report, png):
            click.echo(f"wrote {Path(out_dir) / 'bench.json'} and {png}", err=True)
        else:
            click.echo(f"wrote {Path(out_dir) / 'bench.json'} (no plot: pip install "
                       "matplotlib)", err=True)
