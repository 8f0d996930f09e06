"""Serving benchmark: continuous batching under Poisson arrivals, per scheduler, in one run.

Workload (seeded, the same for every scheduler): arrivals form a Poisson process at each of
--rates requests/s. Prompt and reply lengths are drawn from log-normal distributions shaped like
Chatbot-Arena / LMSYS-Chat-1M conversations, which report means of about 70 prompt tokens and
215 reply tokens with long tails; both means are multiplied by --scale (default 0.25) so that a
CPU run fits in minutes:
    prompt ~ LogNormal(mean 70*scale, sigma 1.0), clipped to [4, 384]
    reply  ~ LogNormal(mean 215*scale, sigma 0.7), clipped to [4, 192]
Prompt text: windows of the held-out documents of the builtin corpus (code, docs, legal,
literature, conversation), cut to the drawn token count. Replies ignore EOS, so that each runs
its drawn length whatever the model says.

Parts:
1. in-process engine, for each budget (--budgets: shares of the expert bytes) x rate x schedule:
   mean/p50/p95 end-to-end latency and time to first token, tokens/s, expert-cache hit ratio and
   distinct experts per layer per step.
2. throughput: one stream alone against --streams concurrent streams (closed loop).
3. `serve` over loopback (127.0.0.1 only): --clients concurrent streaming clients all finish;
   RSS before and after; a client that disconnects frees its slot within how many steps; a burst
   past the queue limit gets 429.
Writes serving.json and plots (latency distributions, throughput against latency) to --out.
Run it alone on the machine (`flock /tmp/heavy.lock python benchmarks/serving.py`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from edge_readme import Engine
from edge_readme.bench import cpu_summary, parse_budgets
from edge_readme.runtime import dry_run_plan
from edge_readme.scheduler import POLICIES

PROMPT_MEAN, REPLY_MEAN = 70, 215  # LMSYS-Chat-1M means, in tokens




def lognormal(rng, mean: float, sigma: float, lo: int, hi: int) -> int:
    mu = math.log(mean) - sigma * sigma / 2  # so that the mean is `mean`
    return int(min(hi, max(lo, round(rng.lognormal(mu, sigma)))))


def workload(tokenizer, n: int, rate: float, scale: float, seed: int) -> list[dict]:
    from edge_readme.refactor.corpus import load_builtin

    rng = np.random.default_rng(seed)
    docs = [tokenizer.encode(d.text) for d in load_builtin("heldout")]
    docs = [d for d in docs if len(d) > 64]
    t, out = 0.0, []
    for i in range(n):
        t += rng.exponential(1.0 / rate)
        plen = lognormal(rng, PROMPT_MEAN * scale, 1.0, 4, 384)
        doc = docs[int(rng.integers(len(docs)))]
        start = int(rng.integers(max(1, len(doc) - plen)))
        out.append({"id": i, "arrival": t, "prompt": doc[start:start + plen],
                    "max_tokens": lognormal(rng, REPLY_MEAN * scale, 0.7, 4, 192)})
    return out


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def replay(engine: Engine, reqs: list[dict], timeout: float) -> dict:
    """Submit each request at its arrival time; per-request latency records and totals."""
    rec: dict[int, dict] = {}
    cache0 = engine.runtime.cache.stats.to_json() if engine.runtime.cache else None
    steps0 = len(engine.step_log)

    def consume(r: dict, stream, t_arr: float) -> None:
        first, n = None, 0
        for c in stream:
            if c.token_id is not None:
                n += 1
                first = first or time.perf_counter()
        end = time.perf_counter()
        rec[r["id"]] = {"e2e": end - t_arr, "ttft": (first or end) - t_arr, "tokens": n,
                        "prompt": len(r["prompt"])}

    start = time.perf_counter()
    threads = []
    for r in reqs:
        delay = start + r["arrival"] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t_arr = start + r["arrival"]
        s = engine.stream(r["prompt"], max_tokens=r["max_tokens"], ignore_eos=True)
        th = threading.Thread(target=consume, args=(r, s, t_arr), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join(max(1.0, start + timeout - time.perf_counter()))
    makespan = time.perf_counter() - start
    lat = [v["e2e"] for v in rec.values()]
    ttft = [v["ttft"] for v in rec.values()]
    toks = sum(v["tokens"] for v in rec.values())
    steps = engine.step_log[steps0:]
    d = {"requests": len(reqs), "finished": len(rec), "makespan_s": round(makespan, 2),
         "tokens": toks, "tokens_per_s": round(toks / makespan, 2),
         "e2e_mean_s": statistics.fmean(lat) if lat else None, "e2e_p50_s": pct(lat, 50),
         "e2e_p95_s": pct(lat, 95), "ttft_mean_s": statistics.fmean(ttft) if ttft else None,
         "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95), "steps": len(steps),
         "mean_sequences_per_step": statistics.fmean(n for n, _, _ in steps) if steps else None,
         "latencies_s": sorted(lat)}
    dist = [x for _, _, x in steps if x is not None]
    d["distinct_experts_per_step"] = statistics.fmean(dist) if dist else None
    if cache0 is not None:
        now = engine.runtime.cache.stats.to_json()
        hits, misses = now["hits"] - cache0["hits"], now["misses"] - cache0["misses"]
        d["hit_ratio"] = round(hits / (hits + misses), 4) if hits + misses else None
    return d


def throughput(engine: Engine, prompts: list[list[int]], n_tokens: int, streams: int,
               repeats: int = 1) -> dict:
    """One stream alone, then `streams` at once, each asked for n_tokens; `repeats` such pairs,
    back to back, so that a shared machine's load swings hit both halves of a pair alike. Each
    pair gives a ratio; the report is the median pair (and every pair)."""
    def one(p):
        r = engine.generate(p, max_tokens=n_tokens, ignore_eos=True)
        return len(r.token_ids)

    def pair() -> dict:
        solo = []
        for p in prompts[:2]:
            t = time.perf_counter()
            n = one(p)
            solo.append(n / (time.perf_counter() - t))
        solo_rate = max(solo)
        per, done = {}, threading.Barrier(streams + 1)

        def worker(i: int) -> None:
            done.wait()
            t = time.perf_counter()
            n = one(prompts[i % len(prompts)])
            per[i] = (n, time.perf_counter() - t)

        ths = [threading.Thread(target=worker, args=(i,)) for i in range(streams)]
        for th in ths:
            th.start()
        done.wait()
        t0 = time.perf_counter()
        for th in ths:
            th.join()
        wall = time.perf_counter() - t0
        agg = sum(n for n, _ in per.values()) / wall
        worst = min(n / s for n, s in per.values())
        return {"solo_tokens_per_s": round(solo_rate, 2), "streams": streams,
                "aggregate_tokens_per_s": round(agg, 2), "ratio": round(agg / solo_rate, 2),
                "worst_stream_tokens_per_s": round(worst, 2),
                "worst_stream_vs_solo": round(worst / solo_rate, 2)}

    pairs = [pair() for _ in range(max(1, repeats))]
    med = sorted(pairs, key=lambda d: d["ratio"])[len(pairs) // 2]
    return {**med, "threads": torch.get_num_threads(),
            **({"pairs": pairs} if len(pairs) > 1 else {})}


def over_serve(engine: Engine, prompts: list[list[int]], clients: int, n_tokens: int) -> dict:
    """32 streaming clients over loopback; disconnect; a burst past the queue limit."""
    import httpx
    import psutil
    import uvicorn

    from edge_readme.server import create_app

    app = create_app(engine, model_name="bench")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    for _ in range(1000):
        if server.started:
            break
        time.sleep(0.01)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    proc = psutil.Process()
    out: dict = {}

    def client(i: int, results: dict, max_tokens: int) -> None:
        body = {"model": "bench", "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                "stream": True}
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
                if r.status_code != 200:
                    r.read()
                    results[i] = (r.status_code, r.headers.get("retry-after"))
                    return
                last = [ln for ln in r.iter_lines() if ln.startswith("data: ")][-1]
                results[i] = (200, last == "data: [DONE]")
        except Exception as e:
            results[i] = ("exception", repr(e))

    try:
        rss0 = proc.memory_info().rss
        res: dict = {}
        cl = [threading.Thread(target=client, args=(i, res, n_tokens)) for i in range(clients)]
        t0 = time.perf_counter()
        for c in cl:
            c.start()
        for c in cl:
            c.join(600)
        out["clients"] = clients
        out["finished"] = sum(1 for v in res.values() if v == (200, True))
        out["refused_429"] = sum(1 for v in res.values() if v[0] == 429)
        out["seconds"] = round(time.perf_counter() - t0, 2)
        out["rss_before_mib"] = round(rss0 / 2**20, 1)
        out["rss_after_mib"] = round(proc.memory_info().rss / 2**20, 1)
        # a client that disconnects: steps from its close to its slot being free
        body = {"model": "bench", "prompt": prompts[0], "max_tokens": 10_000, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            seen = 0
            for ln in r.iter_lines():
                seen += ln.startswith("data: ")
                if seen >= 3:
                    break
            steps_at_close = engine.steps_run
        while engine._sched.running:
            time.sleep(0.002)
        out["disconnect_steps_to_free_slot"] = engine.steps_run - steps_at_close
        # a burst past slots + queue: the rest get 429 with Retry-After, none hangs
        burst = 3 * (len(engine.runtime.slots) + (engine.max_queue or 0))
        res = {}
        cl = [threading.Thread(target=client, args=(i, res, 8)) for i in range(burst)]
        for c in cl:
            c.start()
        for c in cl:
            c.join(600)
        out["burst"] = burst
        out["burst_finished"] = sum(1 for v in res.values() if v == (200, True))
        out["burst_429"] = sum(1 for v in res.values() if v[0] == 429)
        out["burst_429_with_retry_after"] = sum(1 for v in res.values()
                                                if v[0] == 429 and v[1])
        out["burst_hung"] = sum(1 for c in cl if c.is_alive())
    finally:
        server.should_exit = True
        th.join(10)
    return out


def table(report: dict) -> str:
    """The runs as a Markdown table, and the goal checks against the best baseline."""
    rows = ["| budget | req/s | schedule | mean s | p50 s | p95 s | TTFT s | tok/s | hit | "
            "experts/layer/step | seqs/step |", "|" + "---|" * 11]
    f = "{:.2f}".format
    for r in report["runs"]:
        hit = "-" if r.get("hit_ratio") is None else f(r["hit_ratio"])
        ex = r.get("distinct_experts_per_step")
        rows.append(f"| {r['budget']} | {r['rate']} | {r['schedule']} | {f(r['e2e_mean_s'])} | "
                    f"{f(r['e2e_p50_s'])} | {f(r['e2e_p95_s'])} | {f(r['ttft_mean_s'])} | "
                    f"{r['tokens_per_s']} | {hit} | {'-' if ex is None else f(ex)} | "
                    f"{f(r['mean_sequences_per_step'] or 0)} |")
    base = ("fcfs", "decode-first", "prefill-first")
    for key in sorted({(r["budget"], r["rate"]) for r in report["runs"]}):
        cell = {r["schedule"]: r for r in report["runs"] if (r["budget"], r["rate"]) == key}
        best = [cell[b] for b in base if b in cell]
        for s in (x for x in cell if x.startswith("expert-aware")):
            if not best:
                break
            mean = min(b["e2e_mean_s"] for b in best)
            p95 = min(b["e2e_p95_s"] for b in best)
            rows.append(f"\n{s} at {key[0]}, {key[1]} req/s: mean "
                        f"{100 * (1 - cell[s]['e2e_mean_s'] / mean):+.1f}% lower, p95 "
                        f"{100 * (1 - cell[s]['e2e_p95_s'] / p95):+.1f}% lower than the best "
                        "baseline")
    return "\n".join(rows)


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    budgets = sorted({r["budget"] for r in runs})
    fig, axes = plt.subplots(2, len(budgets), figsize=(6 * len(budgets), 9), squeeze=False)
    top = max(r["rate"] for r in runs)
    for j, b in enumerate(budgets):
        ax = axes[0][j]
        for r in runs:
            if r["budget"] == b and r["rate"] == top:
                lat = r["latencies_s"]
                ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=r["schedule"])
        ax.set(title=f"end-to-end latency CDF, budget {b}, {top} req/s", xlabel="seconds",
               ylabel="fraction of requests")
        ax.legend()
        ax = axes[1][j]
        for s in report["schedules"]:
            pts = sorted((r["tokens_per_s"], r["e2e_mean_s"]) for r in runs
                         if r["budget"] == b and r["schedule"] == s)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=s)
        ax.set(title=f"throughput against latency, budget {b}", xlabel="tokens/s",
               ylabel="mean end-to-end latency (s)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "serving.png", dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-readme")
    ap.add_argument("--budgets", default="50%,100%")
    ap.add_argument("--rates", default="0.5,1.0")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--schedules", default=",".join(POLICIES),
                    help="comma list; 'expert-aware@N': at most N distinct experts per layer "
                    "per step, resident or not (plain expert-aware caps the experts to load)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--context-length", type=int, default=512)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--stream-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1,
                    help="throughput: (one stream, --streams streams) pairs; the median pair")
    ap.add_argument("--skip", default="", help="parts to skip: replay,throughput,serve")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--out", default="benchmarks/out/serving")
    ap.add_argument("--plot-only", action="store_true", help="re-plot --out/serving.json")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.plot_only:
        report = json.loads((out / "serving.json").read_text())
        plot(report, out)
        print(table(report))
        return 0
    skip = set(filter(None, a.skip.split(",")))
    kw = {"device": "cpu", "context_length": a.context_length, "max_batch": a.max_batch}
    plan = dry_run_plan(a.model, kw)
    keys, slot = plan["expert_keys"], plan["slot_bytes"]
    fixed = plan["minimum_bytes"] - slot
    schedules = a.schedules.split(",")
    report = {"cpu": cpu_summary()["model"], "model": a.model, "max_batch": a.max_batch,
              "scale": a.scale, "seed": a.seed, "schedules": schedules, "runs": []}

    def load(budget_bytes, schedule, **extra):
        name, _, cap = schedule.partition("@")  # "expert-aware@3": 3 distinct experts a layer
        if cap:
            extra.update(expert_cap=int(cap), cap_loads_only=False)
        return Engine.load(a.model, memory_budget=budget_bytes, schedule=name, **kw, **extra)

    def save() -> None:  # after every part, so that a cut-short run keeps what it measured
        report["seconds"] = round(time.perf_counter() - t_all, 1)
        tmp = out / "serving.json.tmp"
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(out / "serving.json")

    budgets = parse_budgets(a.budgets) if keys else []
    with Engine.load(a.model, **kw) as probe:
        tok = probe.tokenizer
    t_all = time.perf_counter()
    prompts = [r["prompt"] for r in workload(tok, 16, 1.0, a.scale, a.seed + 1)]
    if "throughput" not in skip:
        with load(None, "decode-first") as e:
            e.generate(prompts[0][:8], max_tokens=2)
            report["throughput"] = throughput(e, prompts, a.stream_tokens, a.streams,
                                                  a.repeats)
        print("throughput", report["throughput"], flush=True)
        save()
    if "serve" not in skip:
        with load(None, "decode-first", max_queue=4 * a.max_batch) as e:
            report["serve"] = over_serve(e, prompts, a.clients, a.stream_tokens)
        print("serve", report["serve"], flush=True)
        save()
    if "replay" not in skip:
        for b in budgets or [None]:
            bb = None if b is None else fixed + b.slots(slot, keys) * slot
            for rate in map(float, a.rates.split(",")):
                reqs = workload(tok, a.requests, rate, a.scale, a.seed)
                for s in schedules:
                    with load(bb, s) as e:
                        e.generate(reqs[0]["prompt"][:8], max_tokens=2)  # warm
                        d = replay(e, reqs, a.timeout)
                    d.update(budget=b.label if b else "dense", rate=rate, schedule=s)
                    report["runs"].append(d)
                    save()
                    print(f"{d['budget']:>5} {rate:4} req/s {s:14} mean {d['e2e_mean_s']:.2f}s "
                          f"p95 {d['e2e_p95_s']:.2f}s ttft {d['ttft_mean_s']:.2f}s "
                          f"{d['tokens_per_s']:.1f} tok/s hit {d.get('hit_ratio')} "
                          f"experts/step {d['distinct_experts_per_step']}", flush=True)
    save()
    if report["runs"]:
        plot(report, out)
        print(table(report))
    print(f"wrote {out}/serving.json ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
