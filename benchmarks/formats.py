"""Weight formats against llama.cpp: decode speed, memory and quality, in one interleaved run.

    python benchmarks/formats.py [--threads 2] [--rounds 3] [--out results/formats]

Same GGUF (the default dense model), same thread count, same prompt, greedy. For each of our
variants (dense and the default Read-ME MoE, fully resident, in f32 / q8 / q4) and for llama.cpp,
repetitions are interleaved so that other programs' load hits every variant alike; speeds are
medians, ratios are of medians. Memory: each variant's resident bytes and minimum budget (from the
memory plan), against llama.cpp's peak RSS measured on a child process (psutil) at the same
context length. Quality: held-out perplexity of each format against float32 of the same model
(the built-in held-out split, a few sequences per domain). A decode-time breakdown (cProfile,
by part of the runtime) is printed for the dense model and the MoE in the fastest format.
Writes formats.json and formats.png (with matplotlib). The CPU's flags are printed and recorded.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from edge_readme.bench import cpu_summary, write_json  # noqa: E402

PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes "
          "Gutenberg combined movable metal type, oil-based ink and a wooden press.")
GOALS = {"moe_vs_llama": 1.0, "dense_vs_llama": 0.9, "moe_vs_dense": 1.15,
         "q8_ppl": 1.01, "q4_ppl": 1.04}


# the child's own peak RSS (ru_maxrss would carry the parent's over fork + exec)
HWM = ("print([int(x.split()[1]) * 1024 for x in open('/proc/self/status') "
       "if x.startswith('VmHWM')][0])")


def peer_rss(gguf: str, ctx: int, threads: int, ids: list[int], n: int) -> int:
    """llama.cpp's peak RSS (bytes) in a child process: load at `ctx`, prefill, decode n."""
    code = (
        "import numpy as np\n"
        "from llama_cpp import Llama\n"
        f"llm = Llama({gguf!r}, n_ctx={ctx}, n_threads={threads}, verbose=False)\n"
        f"ids = {ids!r}\n"
        "llm.eval(ids)\n"
        f"for _ in range({n}):\n"
        "    llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])\n"
        f"{HWM}\n")
    return child_peak(code, 300)


def child_peak(code: str, timeout: int) -> int:
    """Run `code` (which prints its VmHWM last) in a fresh interpreter; its peak RSS in bytes."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=timeout, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def our_rss(model: str, weights: str, ctx: int, threads: int, ids: list[int], n: int,
            budget: str | None = None) -> int:
    """Our peak RSS (bytes) in a child process, same work as peer_rss."""
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from edge_readme import Engine\n"
        f"e = Engine.load({model!r}, device='cpu', weights={weights!r}, context_length={ctx},"
        f" threads={threads}, memory_budget={budget!r})\n"
        f"e.generate({ids!r}, max_tokens={n}, ignore_eos=True)\n"
        "e.close()\n"
        f"{HWM}\n")
    return child_peak(code, 600)


def decode_rate(engine, ids: list[int], n: int) -> float:
    engine.reset()
    return engine.generate(ids, max_tokens=n, ignore_eos=True).stats["decode_tokens_per_s"]


def peer_rate(llm, ids: list[int], n: int) -> float:
    import numpy as np

    llm.reset()
    llm.eval(ids)
    t = time.perf_counter()
    for _ in range(n):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return n / (time.perf_counter() - t)


def breakdown(engine, ids: list[int], n: int) -> dict[str, float]:
    """Share of decode time per part of the runtime, from cProfile's cumulative times
    (profiling inflates Python-heavy parts: read the shares, not the absolute times)."""
    rt = engine.runtime
    rt.reset()
    rt.assign(0, ids)
    tok = int(rt.step([(0, ids)])[-1].argmax())
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    for _ in range(n):
        tok = int(rt.step([(0, [tok])], speculate=True)[-1].argmax())
    prof.disable()
    wall = time.perf_counter() - t

    def cum(file: str, *names: str, outermost: bool = False) -> float:
        times = [v[3] for (f, _l, name), v in pstats.Stats(prof).stats.items()
                 if f.endswith(file) and name in names]
        return (max(times) if outermost else sum(times)) if times else 0.0

    total = cum("runtime.py", "step") or 1e-9
    parts = {
        "router": cum("router.py", "route") - cum("runtime.py", "_speculate"),
        "speculation": cum("runtime.py", "_speculate"),
        "schedule (Belady lookahead, prefetch submit)": cum("runtime.py", "_schedule"),
        "expert cache (get, acquire, release)": cum("expert_cache.py", "get", "acquire",
                                                    "release"),
    }
    backbone = cum("model.py", "forward", outermost=True)
    parts["backbone kernels and ops"] = backbone - parts["expert cache (get, acquire, release)"]
    parts["other (bookkeeping, Python)"] = total - backbone - sum(
        v for k, v in parts.items() if k in ("router", "speculation",
                                             "schedule (Belady lookahead, prefetch submit)"))
    out = {k: round(max(v, 0.0) / total, 3) for k, v in parts.items()}
    out["profiled_ms_per_token"] = round(wall / n * 1000, 2)
    return out


def perplexity(model: str, weights: str, sequences: int, seq_len: int) -> float:
    """Held-out perplexity (built-in split, `sequences` per domain) in one weight format."""
    from edge_readme import quant
    from edge_readme.loader import load_model
    from edge_readme.model import build_transformer
    from edge_readme.refactor.corpus import by_domain, load_builtin, token_batches
    from edge_readme.refactor.evaluate import nll, open_moe, seq_logits
    from edge_readme.tokenizer import Tokenizer

    lm, cpu = load_model(model), torch.device("cpu")
    tok = Tokenizer(lm.tokenizer, lm.chat_template)
    if lm.config.moe is not None:
        _, net, router, _ = open_moe(model, weights)
    else:
        net, router = build_transformer(lm.config, lm.tensors, "cpu", torch.float32,
                                        weights=weights), None
    total, count = 0.0, 0
    groups = by_domain(load_builtin("heldout"))
    for _name, docs in sorted(groups.items()):
        for s in token_batches(docs, tok.encode, seq_len, sequences):
            ids = torch.tensor(s)
            route = router.route(ids) if router is not None else None
            with torch.inference_mode():  # the runtime's KV cache dtype for this format
                a, b = nll(seq_logits(net, ids, route, quant.kv_dtype(weights, cpu)), ids)
            total, count = total + a, count + b
    import math

    return math.exp(total / count)


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(result["speed"])
    rates = [result["speed"][n]["decode_tok_s"] for n in names]
    mem = [result["memory"].get(n, {}).get("resident_mib", 0) for n in names]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.barh(names, rates, color=["tab:gray" if n == "llama.cpp" else "tab:blue" for n in names])
    a.set_xlabel("decode tokens/s (median)")
    b.barh(names, mem, color="tab:orange")
    if "llama.cpp" in result["memory"]:
        b.axvline(result["memory"]["llama.cpp"]["peak_rss_mib"], color="k", ls="--",
                  label="llama.cpp peak RSS")
        b.legend()
    b.set_xlabel("resident MiB (ours: weights + KV + slots; llama.cpp: RSS)")
    fig.suptitle(f"{result['cpu']['model']} - {result['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dense", default="smollm2-135m")
    ap.add_argument("--moe", default="smollm2-135m-readme")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--formats", default="f32,q8,q4")
    ap.add_argument("--context", type=int, default=2048, help="context for the memory figures")
    ap.add_argument("--ppl-sequences", type=int, default=2, help="per domain; 0 skips quality")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--out", default="results/formats")
    a = ap.parse_args()

    from edge_readme import Engine
    from edge_readme.loader import load_model
    from edge_readme.registry import resolve
    from edge_readme.runtime import dry_run_plan
    from edge_readme.tokenizer import Tokenizer

    torch.set_num_threads(a.threads)
    dense, moe = str(resolve(a.dense)), str(resolve(a.moe))
    lm = load_model(dense)
    ids = Tokenizer(lm.tokenizer).encode(PROMPT)
    length = len(ids) + a.tokens + 1
    fmts = a.formats.split(",")
    result: dict = {"cpu": cpu_summary(), "threads": a.threads, "torch": torch.__version__,
                    "tokens": a.tokens, "rounds": a.rounds, "goals": GOALS, "speed": {},
                    "memory": {}, "quality": {}, "breakdown": {}}
    print(f"CPU: {result['cpu']['model']} flags {' '.join(result['cpu']['flags'])}")
    runners = {}
    if not a.no_peer:
        from llama_cpp import Llama

        llm = Llama(dense, n_ctx=max(256, length), n_threads=a.threads,
                    n_threads_batch=a.threads, verbose=False)
        runners["llama.cpp"] = lambda: peer_rate(llm, ids, a.tokens)
    engines = {}
    for kind, path in (("dense", dense), ("moe", moe)):
        for f in fmts:
            e = Engine.load(path, device="cpu", weights=f, context_length=length,
                            threads=a.threads)
            engines[f"{kind}-{f}"] = e
            runners[f"{kind}-{f}"] = (lambda e=e: decode_rate(e, ids, a.tokens))
    for run in runners.values():
        run()  # warm-up
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for r in range(a.rounds):
        order = list(runners)
        order = order[r % len(order):] + order[:r % len(order)]
        for k in order:
            samples[k].append(runners[k]())
    for k, s in samples.items():
        result["speed"][k] = {"decode_tok_s": round(statistics.median(s), 2), "samples": s}
    peer = result["speed"].get("llama.cpp", {}).get("decode_tok_s")
    print(f"\n{'variant':12s} {'decode tok/s':>13s} {'x llama.cpp':>12s} {'x dense':>8s}")
    for k, v in result["speed"].items():
        d = v["decode_tok_s"]
        rp = f"{d / peer:12.2f}" if peer else f"{'-':>12s}"
        dk = "dense-" + k.split("-", 1)[1] if k.startswith("moe-") else None
        rd = f"{d / result['speed'][dk]['decode_tok_s']:8.2f}" if dk in result["speed"] else ""
        v["x_llama"] = round(d / peer, 3) if peer else None
        print(f"{k:12s} {d:13.1f} {rp} {rd}")

    # memory: plan figures at --context, and llama.cpp's peak RSS at the same context
    for k in engines:
        kind, f = k.split("-", 1)
        plan = dry_run_plan(dense if kind == "dense" else moe,
                            {"device": "cpu", "weights": f, "context_length": a.context})
        result["memory"][k] = {"resident_mib": round(plan["all_resident_bytes"] / 2**20, 1),
                               "minimum_mib": round(plan["minimum_bytes"] / 2**20, 1)}
    if not a.no_peer:
        rss = peer_rss(dense, a.context, a.threads, ids, 16)
        result["memory"]["llama.cpp"] = {"peak_rss_mib": round(rss / 2**20, 1)}
    best = fmts[-1]
    for kind, path in (("dense", dense), ("moe", moe)):
        rss = our_rss(path, best, a.context, a.threads, ids, 16)
        result["memory"][f"{kind}-{best}"]["peak_rss_mib"] = round(rss / 2**20, 1)
    print(f"\nmemory at context {a.context} (MiB): {json.dumps(result['memory'])}")

    for k in (f"dense-{best}", f"moe-{best}"):
        result["breakdown"][k] = breakdown(engines[k], ids, a.tokens)
        print(f"decode time by part, {k}: {json.dumps(result['breakdown'][k])}")
    for e in engines.values():
        e.close()

    if a.ppl_sequences:
        for kind, path in (("dense", dense), ("moe", moe)):
            ref = None
            for f in ["f32"] + [f for f in fmts if f != "f32"]:
                p = perplexity(path, f, a.ppl_sequences, 256)
                ref = ref or p
                result["quality"][f"{kind}-{f}"] = {"ppl": round(p, 3),
                                                   "ratio_vs_f32": round(p / ref, 4)}
        dense_f32 = result["quality"]["dense-f32"]["ppl"]
        for k, v in result["quality"].items():
            if k.startswith("moe-"):
                v["ratio_vs_dense_f32"] = round(v["ppl"] / dense_f32, 4)
        print(f"\nheld-out perplexity: {json.dumps(result['quality'])}")

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(result, out / "formats.json")
    if plot(result, out / "formats.png"):
        print(f"wrote {out / 'formats.json'} and {out / 'formats.png'}")
    else:
        print(f"wrote {out / 'formats.json'}")


if __name__ == "__main__":
    main()
