"""Decode speed under a memory budget: prefetch + Belady against on-demand LRU, warm and cold.

    python benchmarks/offload.py [--model smollm2-135m-readme] [--reps 3] [--out results/offload]
    python benchmarks/offload.py --synthetic /tmp/moe-synth   # a random MoE of SmolLM2's shape

Budgets are shares of the expert bytes (25%, 50%) on top of the fixed part; 100% is the
all-resident engine, the reference of every ratio. `prefetch` is the runtime's default (Belady,
router-path prefetch, speculative next-token prefetch); `on-demand` is mixtral-offloading's
approach (LRU, no prefetch). Warm storage reads through the page cache; cold storage reads with
O_DIRECT (else fadvise) after dropping the file from the page cache. Repetitions are interleaved
(each one runs every configuration, in rotated order) and ratios are taken within a repetition,
so that other programs' load on the machine cancels out as far as it can.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_readme import Engine  # noqa: E402
from edge_readme.bench import builtin_prompts, write_json  # noqa: E402
from edge_readme.runtime import dry_run_plan  # noqa: E402

MODES = {"prefetch": {"policy": "belady", "prefetch": True, "speculate": 4},
         "on-demand": {"policy": "lru", "prefetch": False, "speculate": 0}}
SHARES = (0.25, 0.5)
GOAL_WARM = 0.9  # prefetch at 50% / all-resident, warm storage
GOAL_COLD = 1.5  # prefetch / on-demand at 50%, cold storage


def write_synthetic(folder: Path, layers: int = 30, experts: int = 5, hidden: int = 576,
                    ffn: int = 1536, shared: int = 256) -> Path:
    """A random Read-ME MoE with SmolLM2-135M's layer shapes (tiny vocabulary), for when the
    default model is not built yet. Uses the test suite's tiny-model writer."""
    import dataclasses

    import torch

    from edge_readme.config import MoEConfig, RouterConfig
    from edge_readme.experts_format import write_experts
    from edge_readme.router import Router
    from tests.tiny_models import tiny_config, tiny_tensors, write_hf

    if (folder / "config.json").exists():
        return folder
    c = tiny_config(layers=layers, hidden_size=hidden, intermediate_size=ffn, num_heads=9,
                    num_kv_heads=3, head_dim=hidden // 9, max_position=2048)
    t = tiny_tensors(c, seed=0)
    g = torch.Generator().manual_seed(1)
    per = (ffn - shared) // experts
    weights = {}
    for i in range(layers):
        p = f"model.layers.{i}.mlp."
        gate, up, down = (t.pop(p + n + "_proj.weight") for n in ("gate", "up", "down"))
        perm = torch.randperm(ffn, generator=g)
        t[p + "shared.gate_proj.weight"] = gate[perm[:shared]]
        t[p + "shared.up_proj.weight"] = up[perm[:shared]]
        t[p + "shared.down_proj.weight"] = down[:, perm[:shared]]
        for e in range(experts):
            rows = perm[shared + e * per: shared + (e + 1) * per]
            weights[(i, e)] = torch.stack([gate[rows], up[rows], down[:, rows].T])  # [3, r, D]
    rcfg = RouterConfig(dim=64, num_layers=1, num_heads=2, ffn_dim=128, max_position=2048)
    moe = MoEConfig(num_experts=experts, routing="global", shared_sizes=(shared,) * layers,
                    router=rcfg, domains=tuple(f"d{e}" for e in range(experts)))
    c = dataclasses.replace(c, moe=moe)
    torch.manual_seed(2)
    router = Router(rcfg, c.vocab_size, experts, layers, "global")
    with torch.no_grad():
        for prm in router.parameters():
            prm.copy_(torch.randn(prm.shape) * 0.5)
    t.update(router.state_tensors())
    write_hf(folder, c, t)
    write_experts(folder, weights, torch.float32)
    return folder


def configs() -> list[dict]:
    out = [{"name": "all-resident", "share": 1.0, "mode": "all-resident", "storage": "warm"}]
    for share in SHARES:
        for mode in MODES:
            for storage in ("warm", "cold"):
                out.append({"name": f"{share:.0%} {mode} {storage}", "share": share,
                            "mode": mode, "storage": storage})
    return out


def open_engine(model: str, cfg: dict, plan: dict, base: dict) -> Engine:
    keys, slot = plan["expert_keys"], plan["slot_bytes"]
    slots = keys if cfg["mode"] == "all-resident" else max(1, int(cfg["share"] * keys))
    budget = plan["minimum_bytes"] - slot + slots * slot
    mode = MODES.get(cfg["mode"], MODES["prefetch"])
    return Engine.load(model, memory_budget=budget, cold=cfg["storage"] == "cold",
                       **mode, **base)


def warm_file(path: Path) -> None:
    """Read the expert file once so that warm runs find it in the page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass


def measure(engine: Engine, cfg: dict, prompt) -> dict:
    """Counters of one generation (deltas)."""
    rt = engine.runtime
    store = rt.cache.store
    if cfg["storage"] == "warm":
        warm_file(store.manifest.path)  # cold stores may have dropped it (fadvise mode)
    t0, c0 = _totals(engine), rt.cache.stats.to_json()
    r0 = (store.bytes_read, store.read_seconds)
    engine.generate(prompt.text, max_tokens=prompt.max_tokens)
    t1, c1 = _totals(engine), rt.cache.stats.to_json()
    out = {k: c1[k] - c0[k] for k in ("hits", "misses", "loads", "stall_seconds")}
    out.update(decode_tokens=t1[0] - t0[0], decode_seconds=t1[1] - t0[1],
               busy_seconds=t1[2] - t0[2], bytes_read=store.bytes_read - r0[0],
               read_seconds=store.read_seconds - r0[1])
    return out


def combine(parts: list[dict], engine: Engine) -> dict:
    """One repetition of one configuration: the sums over its prompts, and rates."""
    s = {k: sum(p[k] for p in parts) for k in parts[0]}
    acc = s["hits"] + s["misses"]
    return {
        "slots": engine.runtime.cache.num_slots, "store_mode": engine.runtime.cache.store.mode,
        "decode_tokens": s["decode_tokens"], "decode_seconds": round(s["decode_seconds"], 4),
        "busy_seconds": round(s["busy_seconds"], 4),  # prefill + decode
        "decode_tokens_per_s": round(s["decode_tokens"] / s["decode_seconds"], 3)
        if s["decode_seconds"] else None,
        "hit_ratio": round(s["hits"] / acc, 4) if acc else None,
        "stall_seconds": round(s["stall_seconds"], 4), "loads": s["loads"],
        "bytes_read": s["bytes_read"], "read_seconds": round(s["read_seconds"], 4),
        "read_gb_per_s": round(s["bytes_read"] / s["read_seconds"] / 1e9, 3)
        if s["read_seconds"] else None,
    }


def _totals(engine) -> tuple[int, float, float]:
    t = engine.totals
    return t.decode_tokens, t.decode_seconds, t.prefill_seconds + t.decode_seconds


def summarize(runs: list[list[dict]], cfgs: list[dict]) -> list[dict]:
    """Per configuration: median tok/s over repetitions, and medians of within-rep ratios."""
    names = [c["name"] for c in cfgs]
    rows = []
    for i, cfg in enumerate(cfgs):
        per = [rep[i] for rep in runs]
        ref = [rep[0]["decode_tokens_per_s"] for rep in runs]
        tps = [r["decode_tokens_per_s"] for r in per]
        row = {**cfg, "decode_tokens_per_s": statistics.median(tps), "reps": tps,
               "vs_all_resident": _median_ratio(tps, ref)}
        if cfg["mode"] == "prefetch":
            twin = names.index(cfg["name"].replace("prefetch", "on-demand"))
            row["vs_on_demand"] = _median_ratio(tps, [rep[twin]["decode_tokens_per_s"]
                                                      for rep in runs])
        for key in ("slots", "store_mode"):
            row[key] = per[0][key]
        for key in ("hit_ratio", "stall_seconds", "busy_seconds", "bytes_read",
                    "read_gb_per_s"):
            vals = [r[key] for r in per if r[key] is not None]
            row[key] = statistics.median(vals) if vals else None
        row["stall_share"] = round(row["stall_seconds"] / row["busy_seconds"], 4) \
            if row["busy_seconds"] else None
        rows.append(row)
    return rows


def _median_ratio(a: list, b: list) -> float | None:
    pairs = [x / y for x, y in zip(a, b) if x and y]
    return round(statistics.median(pairs), 3) if pairs else None


def table(rows: list[dict]) -> str:
    head = ["config", "slots", "tok/s", "x all-res", "x on-demand", "hit", "stall", "read GB/s"]
    lines = [head]
    for r in rows:
        lines.append([r["name"], str(r["slots"]), f"{r['decode_tokens_per_s']:.2f}",
                      _f(r["vs_all_resident"], "{:.2f}"), _f(r.get("vs_on_demand"), "{:.2f}"),
                      _f(r["hit_ratio"], "{:.0%}"), _f(r["stall_share"], "{:.0%}"),
                      _f(r["read_gb_per_s"], "{:.2f}")])
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(x, widths)) for x in lines)


def _f(v, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


def goals(rows: list[dict]) -> dict:
    by = {r["name"]: r for r in rows}
    warm = by["50% prefetch warm"]["vs_all_resident"]
    cold = by["50% prefetch cold"]["vs_on_demand"]
    return {"warm_50_vs_all_resident": warm, "warm_goal": GOAL_WARM,
            "warm_met": warm is not None and warm >= GOAL_WARM,
            "cold_50_vs_on_demand": cold, "cold_goal": GOAL_COLD,
            "cold_met": cold is not None and cold >= GOAL_COLD}


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ref = rows[0]["decode_tokens_per_s"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for mode in MODES:
        for storage, style in (("warm", "-"), ("cold", "--")):
            mine = [r for r in rows if r["mode"] == mode and r["storage"] == storage]
            x = [100 * r["share"] for r in mine] + [100]
            y = [r["decode_tokens_per_s"] for r in mine] + [ref]
            ax.plot(x, y, style, marker="o", label=f"{mode}, {storage}")
    ax.axhline(GOAL_WARM * ref, color="grey", lw=0.8, ls=":", label="0.9 x all-resident")
    ax.set_xlabel("expert slots, % of all experts")
    ax.set_ylabel("decode tokens/s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-readme")
    ap.add_argument("--synthetic", type=Path, default=None,
                    help="Build (once) and use a random MoE of SmolLM2-135M's shape here.")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=3, help="Builtin prompts per run.")
    ap.add_argument("--tokens", type=int, default=32, help="Decode tokens per prompt.")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--weights", choices=["q4", "q8", "bf16", "f16", "f32"], default=None,
                    help="Weight format (default: q4 on CPU, f16 on GPU).")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    ap.add_argument("--out", type=Path, default=Path("results/offload"))
    a = ap.parse_args(argv)
    model = str(write_synthetic(a.synthetic)) if a.synthetic else a.model
    base = {"device": a.device, "context_length": 512, "threads": a.threads,
            "weights": a.weights}
    plan = dry_run_plan(model, base)
    prompts = builtin_prompts(per_domain=1, max_tokens=a.tokens)
    warmup, prompts = prompts[-1], prompts[: a.prompts]
    cfgs = configs()
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        engines = [stack.enter_context(open_engine(model, c, plan, base)) for c in cfgs]
        for e in engines:
            e.generate(warmup.text, max_tokens=4)  # torch warm-up; fills the expert cache
        runs = []
        for rep in range(a.reps):
            parts: list[list[dict]] = [[] for _ in cfgs]
            for k, prompt in enumerate(prompts):
                shift = (rep * len(prompts) + k) % len(cfgs)  # rotate: no config runs first
                for i in list(range(len(cfgs)))[shift:] + list(range(shift)):
                    parts[i].append(measure(engines[i], cfgs[i], prompt))
            runs.append([combine(p, e) for p, e in zip(parts, engines)])
            print(f"rep {rep + 1}/{a.reps}: " + ", ".join(
                f"{c['name']} {r['decode_tokens_per_s']}" for c, r in zip(cfgs, runs[-1])),
                file=sys.stderr)
    rows = summarize(runs, cfgs)
    g = goals(rows)
    print(table(rows))
    print(f"goal warm: 50% prefetch = {g['warm_50_vs_all_resident']}x all-resident "
          f"(>= {GOAL_WARM}: {'met' if g['warm_met'] else 'missed'})")
    print(f"goal cold: 50% prefetch = {g['cold_50_vs_on_demand']}x on-demand "
          f"(>= {GOAL_COLD}: {'met' if g['cold_met'] else 'missed'})")
    a.out.mkdir(parents=True, exist_ok=True)
    report = {"model": model, "plan": plan, "engine": base, "reps": a.reps,
              "workload": {"prompts": len(prompts), "decode_tokens": a.tokens},
              "cpu_count": os.cpu_count(), "seconds": round(time.perf_counter() - start, 1),
              "rows": rows, "goals": g, "raw": runs}
    write_json(report, a.out / "offload.json")
    drawn = plot(rows, a.out / "offload.png")
    print(f"wrote {a.out / 'offload.json'}" + (f" and {a.out / 'offload.png'}" if drawn else ""),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
