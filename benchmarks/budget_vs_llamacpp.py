"""A model larger than its memory budget: edge-readme's Read-ME MoE (prefetch + Belady) and dense
model against llama.cpp with mmap, at budgets of 25/50/75/100% of the dense GGUF's bytes.

Every configuration runs in a fresh worker process (this script with --worker), started inside a
memory cgroup that this script creates as a child of its own (cgroup v1: /sys/fs/cgroup/memory/
<own>/budget-bench-PID, memory.limit_in_bytes = budget) and removes afterwards. The cgroup charges
everything the worker keeps in RAM, the page cache of mmap'd or read files included, so llama.cpp
pages its weights in and out of the same budget edge-readme plans for (`llamacpp-mmap` turns
llama.cpp's weight repacking off, which would copy Q4_K weights into anonymous memory and defeat
mmap; `llamacpp-repack` is llama.cpp's default, for comparison; `llamacpp-small` runs the dense
GGUF requantized by llama.cpp to `--small-quant`, the smaller file a user would pick instead).
edge-readme gets the budget minus what its worker holds outside the memory plan: Python, torch
and the model's tokenizer, measured by a probe worker, plus a margin. Where that plus the plan's
minimum exceeds the budget, the configuration is reported as "does not fit" with the minimum,
without being started. Before each configuration the model files are dropped from the page cache
(posix_fadvise DONTNEED: a cold start). If no cgroup can be made, the run says so and uses a proxy:
the GGUF is fadvise-dropped before every llama.cpp token. That proxy is weaker than real memory
pressure: pages llama.cpp has mapped cannot be dropped, so it reads less than a cgroup forces.

Measured per configuration: time to first token (prompt prefill + first token), decode tokens/s,
bytes read from storage (/proc/self/io read_bytes), held-out perplexity of the model that ran
(teacher-forced over the same code-and-docs text for every system), peak cgroup memory.
Writes JSON and a plot (tokens/s against budget, one line per system, perplexity in the legend).

    python benchmarks/budget_vs_llamacpp.py --dense qwen2.5-coder-1.5b \\
        --moe qwen2.5-coder-1.5b-readme --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PROMPT = ("<|im_start|>user\nWrite a Python function that returns the n-th Fibonacci number "
          "iteratively.<|im_end|>\n<|im_start|>assistant\n")
HELDOUT_TOKENS = 96  # defaults; --heldout-tokens and --decode-tokens shorten a run
DECODE_TOKENS = 32
CONTEXT = 512
MARGIN = 64 << 20  # the worker's allocator and stack slack beyond its measured baseline
GOALS = {"speedup_at_50": 3.0, "moonshot_at_50": 5.0, "ppl_ratio_max": 1.25, "at_100": 0.9}


# ---------------------------------------------------------------- the parent: cgroups, cold cache


class MemoryCgroup:
    """A child of this process's own memory cgroup (v1), limited to `limit` bytes."""

    def __init__(self, limit: int):
        own = next(ln.split(":", 2)[2] for ln in Path("/proc/self/cgroup").read_text().split("\n")
                   if ln.split(":")[1:2] == ["memory"])
        self.path = Path("/sys/fs/cgroup/memory" + own) / f"budget-bench-{os.getpid()}"
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(limit))

    def enter(self) -> None:  # runs in the child between fork and exec
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int:
        return int((self.path / "memory.max_usage_in_bytes").read_text())

    def remove(self) -> None:
        (self.path / "memory.force_empty").write_text("0") if self.path.exists() else None
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def cgroup_available() -> str | None:
    """None if a child memory cgroup can be made here, else why not."""
    try:
        MemoryCgroup(1 << 40).remove()
        return None
    except (OSError, StopIteration) as e:
        return f"no memory cgroup ({e})"


def drop_from_page_cache(paths: list[Path]) -> None:
    for p in paths:
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_config(cfg: dict, limit: int, proxy: bool, timeout: int) -> dict:
    drop_from_page_cache([Path(cfg["path"])])
    cg = None if proxy else MemoryCgroup(limit)
    cfg = {**cfg, "limit": limit, "proxy": proxy}
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)],
                              capture_output=True, text=True, timeout=timeout,
                              preexec_fn=cg.enter if cg else None)
        peak = cg.peak() if cg else None
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout} s"}
    finally:
        if cg:
            cg.remove()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        killed = proc.returncode in (-9, 137)
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "killed: out of memory in the cgroup" if killed else f"failed: {tail}",
                "peak_bytes": peak}
    return {**json.loads(lines[-1]), "peak_bytes": peak}


# ---------------------------------------------------------------- the worker


def read_bytes() -> int:
    for ln in Path("/proc/self/io").read_text().splitlines():
        if ln.startswith("read_bytes:"):
            return int(ln.split()[1])
    return 0


def rss(field: str = "VmRSS") -> int:
    for ln in Path("/proc/self/status").read_text().splitlines():
        if ln.startswith(field + ":"):
            return int(ln.split()[1]) * 1024
    return 0


def peak_rss() -> int:
    return rss("VmHWM")


def heldout_text() -> str:
    """Computed in the parent and passed to workers: importing the corpus imports torch, whose
    ~220 MiB would otherwise count against llama.cpp's budget too."""
    from edge_readme.refactor.corpus import load_builtin

    docs = load_builtin("heldout")
    return "\n\n".join(next(d.text for d in docs if d.domain == dom) for dom in ("code", "docs"))


def nll_of(logprobs_next) -> float:
    return -sum(logprobs_next) / len(logprobs_next)


def worker_probe(cfg: dict) -> dict:
    """What an edge-readme worker holds besides the memory plan: Python, torch, edge-readme and
    the model's tokenizer (151936 entries for Qwen2.5: ~100 MiB of Python objects)."""
    import torch

    from edge_readme import Engine  # noqa: F401
    from edge_readme.loader import load_model
    from edge_readme.tokenizer import Tokenizer

    torch.set_num_threads(cfg["threads"])
    before = rss()
    loaded = load_model(Path(cfg["path"]))  # lazy: headers only
    tok = Tokenizer(loaded.tokenizer, loaded.chat_template)
    tok.encode(PROMPT)
    return {"status": "ok", "rss_bytes": rss(), "tokenizer_bytes": rss() - before}


def worker_ours(cfg: dict) -> dict:
    import torch

    from edge_readme import BudgetTooSmallError, Engine

    threads = cfg["threads"]
    torch.set_num_threads(threads)
    # what Python, torch and the tokenizer hold (measured by the probe) is not ours to plan
    base = max(rss(), cfg["process_bytes"])
    budget = cfg["limit"] - base - MARGIN
    io0, t0 = read_bytes(), time.perf_counter()
    try:
        e = Engine.load(cfg["path"], device="cpu", memory_budget=budget, context_length=CONTEXT,
                        threads=threads, cold=cfg["kind"] == "moe")
    except BudgetTooSmallError as err:
        return {"status": "does not fit: " + str(err).split(";")[0],
                "process_bytes": base, "plan_minimum_bytes": err.minimum_bytes,
                "needs_bytes": base + MARGIN + err.minimum_bytes}
    with e:
        load_s = time.perf_counter() - t0
        load_peak = peak_rss()
        # the build read model.safetensors once; its pages would stay charged to the cgroup
        # until reclaim finds them: drop them now (experts.safetensors is read on demand anyway)
        drop_from_page_cache([Path(cfg["path"])])
        r = e.generate(PROMPT, max_tokens=cfg["decode_tokens"] + 1, temperature=0.0,
                       ignore_eos=True)
        text_ids = e.tokenizer.encode(cfg["heldout"])[:cfg["heldout_tokens"] + 1]
        # teacher-forced, one token a step (as llama.cpp is scored); the engine's own thread
        # is idle between requests, so its runtime can be stepped directly
        rt = e.runtime
        rt.reset()
        logits = rt.step([(0, text_ids[:1])])[0]
        lp = []
        for i, nxt in enumerate(text_ids[1:]):
            lp.append(float(torch.log_softmax(logits.float(), -1)[nxt]))
            if i + 2 < len(text_ids):
                logits = rt.step([(0, [nxt])], speculate=True)[0]
        return {"status": "ok", "load_s": round(load_s, 1),
                "ttft_s": r.stats["time_to_first_token_s"],
                "decode_tok_s": r.stats["decode_tokens_per_s"], "bytes_read": read_bytes() - io0,
                "ppl": round(math.exp(nll_of(lp)), 3), "engine_budget": budget,
                "process_bytes": base, "load_peak_rss": load_peak, "peak_rss": peak_rss(),
                "hit_ratio": (r.stats.get("cache") or {}).get("hit_ratio")}


def worker_llamacpp(cfg: dict) -> dict:
    import llama_cpp.llama_cpp as low  # what llama_cpp.Llama calls for its model params
    import numpy as np
    from llama_cpp import Llama

    if not cfg.get("repack"):
        # llama.cpp repacks Q4_0/Q4_K weights for AVX2 into anonymous buffers ("extra buffer
        # types"): the weights then no longer live in the mmap'd file, and a budget below the
        # model's size is killed. Off, the weights stay file-backed and pageable.
        defaults = low.llama_model_default_params

        def no_repack():
            p = defaults()
            p.use_extra_bufts = False
            return p

        low.llama_model_default_params = no_repack
    io0, t0 = read_bytes(), time.perf_counter()
    # logits of the last token only, small batches: a logits_all buffer (n_ctx x 151936 floats)
    # would itself be most of a small budget
    llm = Llama(cfg["path"], n_ctx=256, n_batch=64, n_threads=cfg["threads"], use_mmap=True,
                logits_all=False, verbose=False)
    load_s = time.perf_counter() - t0
    fd = os.open(cfg["path"], os.O_RDONLY) if cfg["proxy"] else None
    n_vocab = llm.n_vocab()

    def step(tokens) -> np.ndarray:
        llm.eval(tokens)
        if fd is not None:  # the proxy: drop what is not mapped right now
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        # without logits_all, llama-cpp-python (0.3.x) no longer copies logits into llm.scores
        # (they stay zero): read the context's single output row directly
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).astype(np.float64)

    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    t1 = time.perf_counter()
    tok = int(np.argmax(step(ids)))
    ttft = time.perf_counter() - t1
    t2 = time.perf_counter()
    for _ in range(cfg["decode_tokens"]):
        tok = int(np.argmax(step([tok])))
    decode = cfg["decode_tokens"] / (time.perf_counter() - t2)
    text_ids = llm.tokenize(cfg["heldout"].encode(), add_bos=False, special=False)
    text_ids = text_ids[:cfg["heldout_tokens"] + 1]
    llm.reset()
    lp = []
    for cur, nxt in zip(text_ids, text_ids[1:]):  # teacher-forced, as edge-readme is scored
        z = step([cur])
        z -= z.max()
        lp.append(float(z[nxt] - np.log(np.exp(z).sum())))
    return {"status": "ok", "load_s": round(load_s, 1), "ttft_s": round(ttft, 3),
            "decode_tok_s": round(decode, 2), "bytes_read": read_bytes() - io0,
            "ppl": round(math.exp(nll_of(lp)), 3), "peak_rss": peak_rss()}


# ---------------------------------------------------------------- report


def small_gguf(dense: Path, qtype: str) -> Path:
    """The dense GGUF requantized by llama.cpp (its own quantizer, through llama-cpp-python),
    next to it: `<stem>.<qtype>.gguf`, written to a temporary name and renamed when complete."""
    import llama_cpp

    out = dense.with_name(f"{dense.stem}.{qtype}.gguf")
    if out.exists():
        return out
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}", None)
    if ftype is None:
        raise SystemExit(f"--small-quant: llama.cpp has no type {qtype!r} (try Q3_K_S, Q2_K)")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True  # the input is already Q4_K_M
    params.nthread = os.cpu_count() or 1
    tmp = out.with_suffix(".gguf.tmp")
    rc = llama_cpp.llama_model_quantize(str(dense).encode(), str(tmp).encode(), params)
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"llama.cpp could not requantize {dense} to {qtype} (code {rc})")
    tmp.replace(out)
    return out


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system in dict.fromkeys(r["system"] for r in rows):
        pts = [(r["budget_pct"], r["decode_tok_s"]) for r in rows
               if r["system"] == system and r.get("decode_tok_s")]
        ppl = [r["ppl"] for r in rows if r["system"] == system and r.get("ppl")]
        if pts:
            label = f"{system} (ppl {ppl[0]:.2f})" if ppl else system
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xlabel("memory budget, % of the dense GGUF's bytes")
    ax.set_ylabel("decode tokens/s")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--dense", default="qwen2.5-coder-1.5b")
    ap.add_argument("--moe", default="qwen2.5-coder-1.5b-readme")
    ap.add_argument("--budgets", default="25,50,75,100", help="percent of the dense GGUF's bytes")
    ap.add_argument("--systems", default="ours-moe,ours-dense,llamacpp-mmap")
    ap.add_argument("--small-quant", default="Q3_K_S",
                    help="llamacpp-small: the dense GGUF requantized by llama.cpp to this type "
                         "(the smaller file a user would pick instead; made once, cached)")
    ap.add_argument("--threads", type=int, default=2, help="the same for every system")
    ap.add_argument("--decode-tokens", type=int, default=DECODE_TOKENS)
    ap.add_argument("--heldout-tokens", type=int, default=HELDOUT_TOKENS)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    ap.add_argument("--out", default="results/budget/budget_vs_llamacpp.json")
    a = ap.parse_args()
    if a.worker:
        cfg = json.loads(a.worker)
        fn = {"llamacpp": worker_llamacpp, "probe": worker_probe}.get(cfg["kind"], worker_ours)
        print(json.dumps(fn(cfg)), flush=True)
        return 0

    from edge_readme.registry import resolve

    # a SIGTERM unwinds like Ctrl-C: the running worker is killed and its cgroup removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    dense = resolve(a.dense)
    gguf_bytes = dense.stat().st_size
    paths = {"ours-moe": ("moe", a.moe), "ours-dense": ("dense", a.dense),
             "llamacpp-mmap": ("llamacpp", a.dense), "llamacpp-repack": ("llamacpp", a.dense),
             "llamacpp-small": ("llamacpp", None)}
    small = None
    if "llamacpp-small" in a.systems.split(","):
        small = small_gguf(dense, a.small_quant)
        print(f"llamacpp-small: {small.name}, {small.stat().st_size / 2**20:.0f} MiB "
              f"({small.stat().st_size / gguf_bytes:.0%} of the dense GGUF)", file=sys.stderr)
    no_cgroup = cgroup_available()
    if no_cgroup:
        print(f"{no_cgroup}: llama.cpp runs under the fadvise proxy (see the module docstring)",
              file=sys.stderr)
    common = {"threads": a.threads, "decode_tokens": a.decode_tokens,
              "heldout_tokens": a.heldout_tokens, "heldout": heldout_text()}
    needs = edge_readme_needs(a, paths, common)
    for system, n in needs.items():
        print(f"{system}: needs at least {n['needs_bytes'] / 2**20:.0f} MiB "
              f"({n['needs_bytes'] / gguf_bytes:.0%} of the dense GGUF): process "
              f"{n['process_bytes'] / 2**20:.0f} MiB + plan minimum "
              f"{n['plan_minimum_bytes'] / 2**20:.0f} MiB + margin {MARGIN >> 20} MiB",
              file=sys.stderr)
    rows = []
    for pct in [int(x) for x in a.budgets.split(",")]:
        limit = gguf_bytes * pct // 100
        for system in a.systems.split(","):
            kind, name = paths[system]
            cfg = {"kind": kind, "path": str(small if name is None else resolve(name)),
                   "repack": system == "llamacpp-repack", **common,
                   "process_bytes": needs.get(system, {}).get("process_bytes", 0)}
            t = time.time()
            n = needs.get(system)
            if n and n["needs_bytes"] > limit:
                # the worker would be killed before it could say so: torch alone is most of it
                r = {"status": f"does not fit: needs {n['needs_bytes'] / 2**20:.0f} MiB > budget "
                               f"{limit / 2**20:.0f} MiB", **n}
            else:
                r = run_config(cfg, limit, no_cgroup is not None, a.timeout)
            row = {"system": system, "budget_pct": pct, "limit_bytes": limit, **r,
                   "wall_s": round(time.time() - t)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {"dense_gguf": str(dense), "dense_gguf_bytes": gguf_bytes,
              "small_gguf": None if small is None else {
                  "path": str(small), "type": a.small_quant, "bytes": small.stat().st_size},
              "moe": str(resolve(a.moe)), "threads": a.threads,
              "decode_tokens": a.decode_tokens, "heldout_tokens": a.heldout_tokens,
              "context_length": CONTEXT,
              "confinement": no_cgroup or "memory cgroup (v1) per configuration",
              "cpu": _cpu(), "edge_readme_needs": needs, "rows": rows, "goals": GOALS,
              "goal_check": goal_check(rows)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out)
    if plot(rows, out.with_suffix(".png")):
        print(f"plot: {out.with_suffix('.png')}")
    print(json.dumps(report["goal_check"], indent=2))
    return 0


def edge_readme_needs(a, paths: dict, common: dict) -> dict:
    """Per edge-readme system: the worker's own baseline (measured in a probe worker), the memory
    plan's minimum at this context (from the model's headers, no weights read), and their sum."""
    from edge_readme.registry import resolve
    from edge_readme.runtime import dry_run_plan

    ours = [s for s in a.systems.split(",") if paths[s][0] in ("moe", "dense")]
    if not ours:
        return {}
    needs = {}
    for s in ours:
        path = str(resolve(paths[s][1]))
        probe = subprocess.run([sys.executable, __file__, "--worker",
                                json.dumps({"kind": "probe", "threads": a.threads,
                                            "path": path})],
                               capture_output=True, text=True, check=True)
        pr = json.loads(probe.stdout.splitlines()[-1])
        base = pr["rss_bytes"]
        plan = dry_run_plan(path, {"device": "cpu", "context_length": CONTEXT})
        needs[s] = {"process_bytes": base, "tokenizer_bytes": pr["tokenizer_bytes"],
                    "plan_minimum_bytes": plan["minimum_bytes"],
                    "plan_all_resident_bytes": plan["all_resident_bytes"],
                    "needs_bytes": base + MARGIN + plan["minimum_bytes"]}
    return needs


def goal_check(rows: list[dict]) -> dict:
    """The issue's goals, against llama.cpp with mmap at the same budget: met, missed, or not
    measurable (a system did not run there)."""
    def at(system, pct):
        return next((r for r in rows if r["system"] == system and r["budget_pct"] == pct
                     and r.get("status") == "ok"), None)

    dense_ppl = next((r["ppl"] for r in rows if r["system"] == "llamacpp-mmap" and r.get("ppl")),
                     None)
    out = {}
    for pct in sorted({r["budget_pct"] for r in rows}):
        ref, ours = at("llamacpp-mmap", pct), at("ours-moe", pct) or at("ours-dense", pct)
        if pct > 100 or not ref:
            continue
        key = f"at_{pct}"
        if not ours:
            out[key] = "missed: edge-readme does not run at this budget"
            continue
        speed = ours["decode_tok_s"] / ref["decode_tok_s"]
        ratio = ours["ppl"] / dense_ppl if dense_ppl else None
        if pct <= 50:
            ok = speed >= GOALS["speedup_at_50"] and ratio is not None and ratio <= 1.25
            need = ">= 3x and ppl ratio <= 1.25"
        elif pct == 100:
            ok, need = speed >= GOALS["at_100"], ">= 0.9x"
        else:
            ok, need = None, "no goal"
        out[key] = {"speedup": round(speed, 2), "ppl_ratio": ratio and round(ratio, 3),
                    "goal": need, "met": ok}
    return out


def _cpu() -> str:
    for ln in Path("/proc/cpuinfo").read_text().splitlines():
        if ln.startswith("model name"):
            return ln.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
