"""`edge-readme bench`: sweep memory budgets x cache policies x lookahead modes over a workload.

Each cell loads a fresh engine (an empty expert cache), runs every prompt of the workload at
temperature 0, and reads the cache counters and the access trace the cache records. The offline
optimum of a cell is Belady's MIN over that cell's whole trace with the cell's slot count: no
policy, with or without prefetch, can load fewer experts. This module knows the Engine API and
the cache counters; it knows nothing about the command line (see `edge_readme/cli/bench.py`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .budget import parse_budget
from .cache.policies import POLICIES, simulate
from .errors import BudgetError, DataError, EdgeReadmeError
from .fsutil import atomic_write

# What each lookahead mode lets the runtime do beyond the router's path of the current step
# (which Belady always sees): `none` loads on demand, `path` prefetches the known path, and
# `path+spec` also prefetches the first layers of the likeliest next token's path.
LOOKAHEAD_MODES: dict[str, dict[str, Any]] = {
    "none": {"prefetch": False, "speculate": 0},
    "path": {"prefetch": True, "speculate": 0},
    "path+spec": {"prefetch": True, "speculate": 4},
}
DEFAULT_BUDGETS = "25%,50%,100%"
DEFAULT_MAX_TOKENS = 16


@dataclasses.dataclass(frozen=True)
class Prompt:
    text: str
    max_tokens: int
    domain: str = ""


@dataclasses.dataclass(frozen=True)
class BudgetSpec:
    """A share of the expert bytes (`share`) or an absolute size for the expert slots."""

    label: str
    share: float | None = None
    expert_bytes: int | None = None

    def slots(self, slot_bytes: int, num_keys: int) -> int:
        if self.share is not None:
            n = math.floor(self.share * num_keys + 1e-9)
        else:
            n = min(num_keys, self.expert_bytes // slot_bytes)
        if n < 1:
            raise BudgetError(
                f"--budgets {self.label}: holds no expert slot ({num_keys} experts of "
                f"{slot_bytes} bytes each, 1 slot = {100 / num_keys:.1f}%); raise it"
            )
        return n


# ---- workload ---------------------------------------------------------------------------------


def cpu_summary() -> dict:
    """The CPU a figure was measured on: model name, the instruction sets that decide the
    kernels (AVX2 / AVX-512 / BF16 / VNNI / AMX), and the core count (benchmarks print it)."""
    flags, model = set(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    keep = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16",
            "amx_int8", "avx_vnni")
    return {"model": model, "flags": [f for f in keep if f in flags], "cores": os.cpu_count()}


def builtin_prompts(per_domain: int = 2, chars: int = 200,
                    max_tokens: int = DEFAULT_MAX_TOKENS) -> list[Prompt]:
    """The first `chars` characters of `per_domain` held-out documents of each builtin domain."""
    from .refactor.corpus import by_domain, load_builtin

    out = []
    for domain, docs in by_domain(load_builtin("heldout")).items():
        for doc in docs[:per_domain]:
            out.append(Prompt(_cut(doc.text, chars), max_tokens, domain))
    return out


def _cut(text: str, chars: int) -> str:
    if len(text) <= chars:
        return text
    cut = text[:chars]
    space = cut.rfind(" ")
    return cut[:space] if space > chars // 2 else cut


def load_prompts(path: str | os.PathLike, max_tokens: int = DEFAULT_MAX_TOKENS) -> list[Prompt]:
    """JSONL lines `{"prompt": str, "max_tokens"?: int}`; blank lines are skipped."""
    path = Path(path)
    example = 'expected one JSON object per line like {"prompt": "Hello", "max_tokens": 32}'
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the prompt file ({e}); {example}") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg}); {example}") from None
        if not isinstance(rec, dict):
            raise DataError(f"{where}: found a JSON {type(rec).__name__}; {example}")
        prompt = rec.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise DataError(f"{where}: field 'prompt': expected a non-empty string, found "
                            f"{prompt!r}; {example}")
        tokens = rec.get("max_tokens", max_tokens)
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
            raise DataError(f"{where}: field 'max_tokens': expected an integer >= 1, found "
                            f"{tokens!r}; {example}")
        out.append(Prompt(prompt, tokens))
    if not out:
        raise DataError(f"{path}: no prompts; {example}")
    return out


# ---- sweep axes -------------------------------------------------------------------------------

_PERCENT = re.compile(r"(\d+(?:\.\d+)?|\.\d+)%")


def parse_budgets(text: str) -> list[BudgetSpec]:
    """'25%,50%,300MiB' -> shares of the expert bytes, or absolute sizes of the expert slots."""
    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            raise BudgetError(f"--budgets {text!r}: an empty item; give a comma list like "
                              "'25%,50%,100%' or '64MiB,128MiB'")
        m = _PERCENT.fullmatch(item)
        if m is not None:
            share = float(m.group(1)) / 100
            if not 0 < share <= 1:
                raise BudgetError(f"--budgets {item!r}: a share of the expert bytes must lie "
                                  "in (0%, 100%]")
            out.append(BudgetSpec(item, share=share))
            continue
        try:
            size = parse_budget(item)
        except BudgetError as e:
            raise BudgetError(f"--budgets {item!r}: expected a percentage like '50%' or a "
                              f"size; {e}") from None
        if size is None:
            raise BudgetError(f"--budgets {item!r}: 'auto' is not a sweep point; give a "
                              "percentage like '50%' or a size like '300MiB'")
        out.append(BudgetSpec(item, expert_bytes=size))
    return out


def parse_choices(text: str, allowed: Sequence[str], flag: str) -> list[str]:
    items = [s.strip() for s in text.split(",")]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise EdgeReadmeError(f"{flag} {text!r}: unknown {', '.join(map(repr, bad))}; expected "
                              f"a comma list of {', '.join(allowed)}")
    return list(dict.fromkeys(items))


# ---- one cell ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cell:
    budget: BudgetSpec
    slots: int
    budget_bytes: int
    policy: str
    lookahead: str

    @property
    def label(self) -> str:
        return f"{self.budget.label} {self.policy} {self.lookahead}"


def offline_optimum(trace: Sequence[tuple[int, int, int]], slots: int, num_keys: int) -> float:
    """Belady's MIN hit ratio over the whole trace, from an empty cache of `slots` experts.

    With a slot per expert the runtime loads every expert before the first request: 1.0.
    """
    if slots >= num_keys:
        return 1.0
    return simulate([(layer, expert) for _, layer, expert in trace], slots, "belady").hit_ratio


def run_cell(model: str, cell: Cell, prompts: Sequence[Prompt], engine_kwargs: dict,
             on_prompt: Callable[[], None] | None = None) -> tuple[dict, list]:
    """Run the workload on a fresh engine; the cell's figures and its access trace."""
    from .engine import Engine

    kw = {**engine_kwargs, **LOOKAHEAD_MODES[cell.lookahead]}
    engine = Engine.load(model, memory_budget=cell.budget_bytes, policy=cell.policy, **kw)
    with engine:
        cache = engine.runtime.cache
        if cache is None:
            raise EdgeReadmeError(f"bench: {model} is a dense model; bench measures the expert "
                                  "cache of a Read-ME MoE")
        cache.trace, cache.step = [], 0
        cache.reset_stats()
        for p in prompts:
            engine.generate(p.text, max_tokens=p.max_tokens)
            if on_prompt is not None:
                on_prompt()
        trace, cache.trace = cache.trace, None
        s, t = cache.stats, engine.totals
        num_keys = len(engine.runtime.manifest.entries)
    busy = t.prefill_seconds + t.decode_seconds
    accesses = s.hits + s.misses + s.low_precision  # low-bit uses: --miss-precision
    row = {
        "budget": cell.budget.label, "share": round(cell.slots / num_keys, 4),
        "slots": cell.slots, "budget_bytes": cell.budget_bytes,
        "policy": cell.policy, "lookahead": cell.lookahead,
        "accesses": accesses, "hits": s.hits, "misses": s.misses, "loads": s.loads,
        "hit_ratio": _ratio(s.hits, accesses),
        "load_hit_ratio": _ratio(accesses - s.loads, accesses),
        "optimum_hit_ratio": round(offline_optimum(trace, cell.slots, num_keys), 4),
        "prefetch_issued": s.prefetch_issued, "prefetch_hits": s.prefetch_hits,
        "prefetch_wasted": s.prefetch_wasted, "bytes_read": s.bytes_read,
        "low_precision": s.low_precision, "low_precision_rate": _ratio(s.low_precision, accesses),
        "stall_seconds": round(s.stall_seconds, 4), "stall_share": _ratio(s.stall_seconds, busy),
        "prefill_tokens": t.prefill_tokens,
        "prefill_tokens_per_s": _rate(t.prefill_tokens, t.prefill_seconds),
        "decode_tokens": t.decode_tokens,
        "decode_tokens_per_s": _rate(t.decode_tokens, t.decode_seconds),
        "speculation": {"guesses": t.speculations, "right": t.speculations_right,
                        "accuracy": _ratio(t.speculations_right, t.speculations)},
    }
    return row, trace


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


def _rate(n: int, seconds: float) -> float | None:
    return round(n / seconds, 2) if n and seconds > 0 else None


# ---- the sweep --------------------------------------------------------------------------------


def plan_cells(model: str, budgets: Sequence[BudgetSpec], policies: Sequence[str],
               modes: Sequence[str], engine_kwargs: dict) -> tuple[list[Cell], dict]:
    """The sweep's cells, budget-major, and the fixed part of the memory plan."""
    from .runtime import dry_run_plan

    plan = dry_run_plan(model, engine_kwargs)
    keys, slot = plan["expert_keys"], plan["slot_bytes"]
    if not keys:
        raise EdgeReadmeError(f"bench: {model} is a dense model; bench measures the expert "
                              "cache of a Read-ME MoE")
    fixed = plan["minimum_bytes"] - slot  # dense weights, KV cache and scratch
    info = {"fixed_bytes": fixed, "slot_bytes": slot, "expert_keys": keys,
            "expert_bytes": keys * slot, "device": plan["device"], "dtype": plan["dtype"],
            "context_length": plan["context_length"]}
    cells = []
    for b in budgets:
        n = b.slots(slot, keys)
        cells += [Cell(b, n, fixed + n * slot, p, m) for p in policies for m in modes]
    return cells, info


def sweep(model: str, prompts: Sequence[Prompt], budgets: Sequence[BudgetSpec],
          policies: Sequence[str] = tuple(POLICIES), modes: Sequence[str] = tuple(LOOKAHEAD_MODES),
          engine_kwargs: dict | None = None, progress: bool = False,
          trace_path: str | os.PathLike | None = None) -> dict:
    """Run every cell; the JSON report. `trace_path` gets the first cell's access trace."""
    kw = dict(engine_kwargs or {})
    cells, info = plan_cells(model, budgets, policies, modes, kw)
    bar = _bar(len(cells) * len(prompts), progress)
    rows, start = [], time.perf_counter()
    try:
        for i, cell in enumerate(cells):
            bar.set_postfix_str(cell.label)
            row, trace = run_cell(model, cell, prompts, kw, on_prompt=lambda: bar.update(1))
            rows.append(row)
            if i == 0 and trace_path is not None:
                write_trace(trace, trace_path)
    finally:
        bar.close()
    report = {
        "model": model, "plan": info, "engine": kw,
        "workload": {"prompts": len(prompts),
                     "max_tokens": sorted({p.max_tokens for p in prompts}),
                     "domains": sorted({p.domain for p in prompts if p.domain})},
        "lookahead_modes": {m: LOOKAHEAD_MODES[m] for m in modes},
        "cells": rows, "seconds": round(time.perf_counter() - start, 2),
    }
    if trace_path is not None:
        report["trace"] = {"file": str(trace_path), "cell": 0}
    return report


def _bar(total: int, enabled: bool):
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc="bench", unit="prompt", disable=not enabled, file=sys.stderr,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} "
                           "[{elapsed}<{remaining}] {postfix}")


# ---- output -----------------------------------------------------------------------------------


def write_trace(trace: Sequence[tuple[int, int, int]], path: str | os.PathLike) -> None:
    """JSONL, one {"step", "layer", "expert"} object per access, in access order."""
    lines = "".join(f'{{"step": {s}, "layer": {layer}, "expert": {e}}}\n' for s, layer, e in trace)
    atomic_write(path, lambda f: f.write(lines))


def read_trace(path: str | os.PathLike) -> list[tuple[int, int, int]]:
    with open(path, encoding="utf-8") as f:
        return [(r["step"], r["layer"], r["expert"]) for r in map(json.loads, f) if r]


def write_json(report: dict, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: json.dump(report, f, indent=2))


COLUMNS = [("budget", "budget", "{}"), ("slots", "slots", "{}"), ("policy", "policy", "{}"),
           ("lookahead", "lookahead", "{}"), ("hit", "hit_ratio", "{:.1%}"),
           ("load-hit", "load_hit_ratio", "{:.1%}"), ("optimum", "optimum_hit_ratio", "{:.1%}"),
           ("MiB read", "bytes_read", "mib"), ("prefill t/s", "prefill_tokens_per_s", "{:.1f}"),
           ("decode t/s", "decode_tokens_per_s", "{:.1f}"), ("stall", "stall_share", "{:.1%}"),
           ("spec", "speculation", "spec")]
LOW_BIT = ("low-bit", "low_precision_rate", "{:.1%}")  # with --miss-precision: its fire rate


def format_table(report: dict) -> str:
    """One line per cell; `hit` counts prefetched experts as hits, `load-hit` is 1 - loads /
    accesses (the figure the optimum bounds)."""
    cols = COLUMNS + [LOW_BIT] * bool(report.get("engine", {}).get("miss_precision"))
    rows = [[name for name, _, _ in cols]]
    for cell in report["cells"]:
        rows.append([_fmt(cell[key], f) for _, key, f in cols])
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows)


def _fmt(value: Any, f: str) -> str:
    if f == "mib":
        return f"{value / 2**20:.1f}"
    if f == "spec":
        return "-" if value["accuracy"] is None else f"{value['accuracy']:.0%}"
    return "-" if value is None else f.format(value)


def plot(report: dict, path: str | os.PathLike) -> bool:
    """Hit ratio and decode tok/s against the expert share, one panel column per lookahead
    mode, a line per policy and the offline optimum. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cells = report["cells"]
    modes = list(dict.fromkeys(c["lookahead"] for c in cells))
    policies = list(dict.fromkeys(c["policy"] for c in cells))
    fig, axes = plt.subplots(2, len(modes), figsize=(4.5 * len(modes), 7), squeeze=False)
    for j, mode in enumerate(modes):
        top, bottom = axes[0][j], axes[1][j]
        for policy in policies:
            mine = sorted((c for c in cells if c["lookahead"] == mode and c["policy"] == policy),
                          key=lambda c: c["share"])
            x = [100 * c["share"] for c in mine]
            top.plot(x, [c["load_hit_ratio"] for c in mine], marker="o", label=policy)
            bottom.plot(x, [c["decode_tokens_per_s"] or 0 for c in mine], marker="o",
                        label=policy)
        shares = sorted({c["share"] for c in cells if c["lookahead"] == mode})
        best = [max(c["optimum_hit_ratio"] for c in cells
                    if c["lookahead"] == mode and c["share"] == s) for s in shares]
        top.plot([100 * s for s in shares], best, "k--", label="offline optimum")
        top.set_title(f"lookahead: {mode}")
        top.set_ylabel("hit ratio (1 - loads / accesses)")
        bottom.set_ylabel("decode tokens/s")
        bottom.set_xlabel("expert slots, % of all experts")
        top.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)
    return True


__all__ = ["BudgetSpec", "LOOKAHEAD_MODES", "Prompt", "builtin_prompts", "format_table",
           "load_prompts", "offline_optimum", "parse_budgets", "plot", "read_trace", "run_cell",
           "sweep", "write_json", "write_trace"]
