"""Expert Router benchmark: routed experts vs one generalist vs random routing, simulated users.

Three server configurations, each a real `edge-readme serve` process on 127.0.0.1 (loopback
only), all under the same --memory-budget, --max-batch, --max-queue and --context-length:
- routed:     SmolLM2-135M Read-ME + Qwen2.5-Coder-0.5B Read-ME, `--route linear` (TF-IDF);
- generalist: SmolLM2-135M Read-ME alone (it fits whole in the budget);
- random:     the two models, `--route random` (a seeded uniform choice per prompt);
- routed-docs-coder (only with --config): routed, but a route file sends docs to the coder too.

Workload (seeded; the same requests in the same order for every configuration): each request is
one chat turn whose text is a held-out prompt of the routing corpus (never seen by the router),
its domain drawn with probabilities code 0.5, chat 0.35, docs 0.15. Replies are streamed, ask for
--max-tokens tokens at temperature 0 and ignore EOS, so every served request does the same work.
Users are closed-loop clients with their own connection, all started at once: 1 user sends 8
requests one after another, 10 users 3 each, 100 users and 1000 users 1 each. A request that
gets 429 (the queue is full: --max-queue) is counted and not retried. Every request has a
timeout (--request-timeout), every level a wall-clock limit (--level-timeout).

Measured per level: throughput (completion tokens/s, requests/s), mean/p95 latency and time to
first token, the router's time (the server's x-edge-readme-route-ms header) as a share of mean
latency, statuses (200, 429, other failures), the TCP connections the server process held open
(sampled), GET /health latency probed every 0.25 s from a process of its own (the users' event
loop and GIL are busy), and the server's RSS.
Quality per domain: bits per byte (a perplexity that does not depend on the tokenizer) of each
model on held-out documents of the builtin calibration corpus (code, conversation, docs), then,
for each configuration, the mean over its served requests of the bits per byte of the model each
request went to, per domain of the request.

The three servers run side by side (idle ones wait on their queues) and each level is run on
each server in turn, so all three meet the same background load: compare them within one run.

Parts (each writes JSON under --out; `report` merges them and plots latency against users):
    flock /tmp/heavy.lock python benchmarks/expert_router.py --part load
    flock /tmp/heavy.lock python benchmarks/expert_router.py --part quality
    python benchmarks/expert_router.py --part report
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

CHAT, CODER = "smollm2-135m-readme", "qwen2.5-coder-0.5b-readme"
CONFIGS = {"routed": ["--route", "linear", "-m", CHAT, "-m", CODER],
           "generalist": ["-m", CHAT],
           "random": ["--route", "random", "-m", CHAT, "-m", CODER],
           # the linear router with docs sent to the coder too (a route file, written at start)
           "routed-docs-coder": ["--route-file", "{out}/route-docs-coder.json"]}
DEFAULT_CONFIGS = ["routed", "generalist", "random"]  # routed-docs-coder: by --config
DOCS_TO_CODER = {"models": [CHAT, CODER], "route": "linear",
                 "table": {"code": CODER, "chat": CHAT, "docs": CODER}}
LEVELS = [(1, 8), (10, 3), (100, 1), (1000, 1)]  # (concurrent users, requests per user)
MIX = {"code": 0.5, "chat": 0.35, "docs": 0.15}
QUALITY_DOMAINS = {"code": "code", "chat": "conversation", "docs": "docs"}
ROOT = Path(__file__).resolve().parent.parent


def workload(n: int, seed: int) -> list[tuple[str, str]]:
    """n (prompt, domain) pairs from the routing corpus's held-out prompts, seeded."""
    sys.path.insert(0, str(ROOT))
    from edge_readme.routing import load_corpus

    pool: dict[str, list[str]] = {}
    for text, dom in load_corpus("test"):
        pool.setdefault(dom, []).append(text)
    rng = random.Random(seed)
    doms = rng.choices(list(MIX), weights=list(MIX.values()), k=n)
    return [(rng.choice(pool[d]), d) for d in doms]


# ------------------------------------------------------------------ the server process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(config: str, a, port: int, log: Path) -> subprocess.Popen:
    if config == "routed-docs-coder":
        atomic_json(a.out / "route-docs-coder.json", DOCS_TO_CODER)
    argv = [x.format(out=a.out) for x in CONFIGS[config]]
    cmd = [sys.executable, "-m", "edge_readme.cli.main", "serve", *argv,
           "--host", "127.0.0.1", "--port", str(port), "--memory-budget", a.memory_budget,
           "--context-length", str(a.context_length), "--max-batch", str(a.max_batch),
           "--max-queue", str(a.max_queue), "--max-tokens-limit", "64", "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = open(log, "w")
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def wait_ready(proc: subprocess.Popen, base: str, limit: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} while loading")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server was not ready within {limit:.0f} s")


class Sampler:
    """The server process's RSS and open TCP connections to its port, every `every` s."""

    def __init__(self, pid: int, port: int, every: float = 0.5):
        self.proc, self.port, self.every = psutil.Process(pid), port, every
        self.rss: list[int] = []
        self.conns: list[int] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.rss.append(self.proc.memory_info().rss)
                get = getattr(self.proc, "net_connections", None) or self.proc.connections
                self.conns.append(sum(1 for c in get(kind="tcp")
                                      if c.laddr and c.laddr.port == self.port
                                      and c.status == psutil.CONN_ESTABLISHED))
            except (psutil.Error, OSError):
                pass
            self._stop.wait(self.every)

    def __enter__(self) -> "Sampler":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join(5)


# ------------------------------------------------------------------ simulated users


async def one_request(client: httpx.AsyncClient, body: dict, timeout: float) -> dict:
    t0 = time.perf_counter()
    rec: dict = {"status": None}
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body,
                                 timeout=timeout) as r:
            rec["status"] = r.status_code
            rec["model"] = r.headers.get("x-edge-readme-model")
            rec["route_ms"] = float(r.headers.get("x-edge-readme-route-ms", 0.0))
            if r.status_code != 200:
                await r.aread()
                return rec
            tokens, ttft = 0, None
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                d = json.loads(line[6:])
                if "error" in d:
                    rec["status"] = "stream_error"
                    rec["error"] = d["error"].get("message")
                ch = d.get("choices") or []
                if ch and ch[0].get("delta", {}).get("content") and ttft is None:
                    ttft = time.perf_counter() - t0
                if d.get("usage"):
                    tokens = d["usage"]["completion_tokens"]
                    rec["model"] = rec["model"] or d.get("model")
            rec.update(latency=time.perf_counter() - t0, ttft=ttft, tokens=tokens)
    except Exception as e:  # noqa: BLE001 - every failure is counted, by kind
        rec["status"] = type(e).__name__
        rec["error"] = str(e)[:200]
    return rec


# GET /health every 0.25 s from a process of its own (neither the users' event loop nor their
# GIL delays it) until its stdin closes; prints the latencies.
PROBE = """
import json, sys, threading, time
import httpx
from edge_readme.bench import cpu_summary
stop, lat, failed = threading.Event(), [], 0
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
with httpx.Client(base_url=sys.argv[1]) as c:
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            r = c.get("/health", timeout=5)
            lat.append(time.perf_counter() - t0)
            failed += r.status_code != 200
        except httpx.HTTPError:
            failed += 1
        stop.wait(0.25)
print(json.dumps({"latencies": lat, "failed": failed}))
"""


async def run_level(base: str, model: str, users: int, per_user: int, a, seed: int) -> dict:
    reqs = workload(users * per_user, seed)
    limits = httpx.Limits(max_connections=users + 4, max_keepalive_connections=users + 4)
    results: list[dict] = []

    async def user(u: int, client: httpx.AsyncClient) -> None:
        for k in range(per_user):
            prompt, dom = reqs[u * per_user + k]
            body = {"model": model, "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": a.max_tokens, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            rec = await one_request(client, body, a.request_timeout)
            rec["domain"] = dom
            results.append(rec)

    async with httpx.AsyncClient(base_url=base, limits=limits) as client:
        probe = subprocess.Popen([sys.executable, "-c", PROBE, base], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(user(u, client)) for u in range(users)]
        _, pending = await asyncio.wait(tasks, timeout=a.level_timeout)
        for t in pending:
            t.cancel()
        wall = time.perf_counter() - t0
        out, _ = probe.communicate("", timeout=30)  # closing its stdin stops it
    h = json.loads(out)
    health, health_fail = h["latencies"], h["failed"]
    return summarize(results, wall, health, health_fail, len(pending), users * per_user)


def pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 4) if xs else None


def mean(xs: list[float]) -> float | None:
    return round(statistics.fmean(xs), 4) if xs else None


def summarize(results: list[dict], wall: float, health: list[float], health_fail: int,
              cut: int, asked: int) -> dict:
    ok = [r for r in results if r["status"] == 200]
    lat = [r["latency"] for r in ok]
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    if cut:
        statuses["cut_by_level_timeout"] = asked - len(results)
    routes = {}
    for r in ok:
        routes.setdefault(r["domain"], {}).setdefault(r["model"], 0)
        routes[r["domain"]][r["model"]] += 1
    route_ms = [r["route_ms"] for r in ok]
    return {
        "requests": asked, "served": len(ok), "statuses": statuses, "wall_s": round(wall, 3),
        "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 3) if wall else None,
        "requests_per_s": round(len(ok) / wall, 4) if wall else None,
        "latency_s": {"mean": mean(lat), "p50": pct(lat, 50), "p95": pct(lat, 95)},
        "ttft_s": {"mean": mean([r["ttft"] for r in ok if r["ttft"] is not None]),
                   "p95": pct([r["ttft"] for r in ok if r["ttft"] is not None], 95)},
        "route_ms_mean": mean(route_ms),
        "route_share_of_mean_latency": (round(statistics.fmean(route_ms) / 1e3
                                              / statistics.fmean(lat), 6) if ok else None),
        "routes": routes,
        "health": {"probes": len(health), "failed": health_fail, "max_s": pct(health, 100),
                   "p95_s": pct(health, 95)},
        "_served": [(r["domain"], r["model"]) for r in ok],
    }


def part_load(configs: list[str], a) -> None:
    """Start every configuration's server, then run each level on each server in turn, so the
    configurations meet the same background load (the machine is shared): ratios within a run."""
    from edge_readme.bench import cpu_summary  # here: the clients' processes stay torch-free

    procs: dict[str, tuple[subprocess.Popen, int]] = {}
    reports: dict[str, dict] = {}
    try:
        for c in configs:  # one at a time: loads do not compete with each other
            port = free_port()
            procs[c] = (start_server(c, a, port, a.out / f"{c}.server.log"), port)
            reports[c] = {"config": c, "argv": CONFIGS[c], "cpu": cpu_summary()["model"],
                          "cores": os.cpu_count(), "levels": {},
                          "load_s": round(wait_ready(procs[c][0], f"http://127.0.0.1:{port}",
                                                     a.load_timeout), 2)}
        for users, per_user in LEVELS:
            if not a.min_users <= users <= a.max_users:
                continue
            for c in configs:
                proc, port = procs[c]
                model = CHAT if c == "generalist" else "auto"
                with Sampler(proc.pid, port) as s:
                    lvl = asyncio.run(run_level(f"http://127.0.0.1:{port}", model, users,
                                                per_user, a, seed=users))
                lvl["server_connections_max"] = max(s.conns, default=0)
                lvl["rss_bytes"] = {"start": s.rss[0] if s.rss else None,
                                    "max": max(s.rss, default=None),
                                    "end": s.rss[-1] if s.rss else None}
                reports[c]["levels"][str(users)] = lvl
                print(f"{c:10s} users={users:5d} served={lvl['served']:4d} "
                      f"statuses={lvl['statuses']} mean={lvl['latency_s']['mean']} "
                      f"p95={lvl['latency_s']['p95']} tok/s={lvl['tokens_per_s']} "
                      f"route={lvl['route_share_of_mean_latency']} "
                      f"conns={lvl['server_connections_max']} "
                      f"health_max={lvl['health']['max_s']}", flush=True)
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    for c, r in reports.items():
        if r["levels"]:
            atomic_json(a.out / f"{c}.json", r)


# ------------------------------------------------------------------ quality


def part_quality(a) -> None:
    """Bits per byte of each model on held-out documents of each domain."""
    import torch

    sys.path.insert(0, str(ROOT))
    from edge_readme.refactor.corpus import load_builtin
    from edge_readme.refactor.evaluate import nll, open_moe, seq_logits
    from edge_readme.registry import resolve
    from edge_readme.tokenizer import Tokenizer

    docs = load_builtin("heldout")
    out: dict = {"docs_per_domain": a.quality_docs, "chars_per_doc": a.quality_chars,
                 "bits_per_byte": {}}
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    for name in (CHAT, CODER):
        loaded, model, router, _ = open_moe(resolve(name))
        tok = Tokenizer(loaded.tokenizer, loaded.chat_template)
        row = {}
        for label, dom in QUALITY_DOMAINS.items():
            texts = [d.text[: a.quality_chars] for d in docs if d.domain == dom]
            texts = texts[: a.quality_docs]
            nats, nbytes = 0.0, 0
            for text in texts:
                ids = torch.tensor(tok.encode(text, add_bos=False))
                lg = seq_logits(model, ids, router.route(ids))
                n, _ = nll(lg, ids)
                nats += n
                nbytes += len(tok.decode(ids[1:].tolist()).encode("utf-8"))
            row[label] = round(nats / math.log(2) / nbytes, 4)
        out["bits_per_byte"][name] = row
        print(name, row, flush=True)
        del model, router, loaded
    atomic_json(a.out / "quality.json", out)


# ------------------------------------------------------------------ report


def part_report(a) -> None:
    runs = {c: json.loads((a.out / f"{c}.json").read_text()) for c in CONFIGS
            if (a.out / f"{c}.json").exists()}
    q = json.loads((a.out / "quality.json").read_text()) if (a.out / "quality.json").exists() \
        else None
    merged: dict = {"configs": {}, "quality_bits_per_byte": q}
    for c, r in runs.items():
        served = [tuple(x) for lvl in r["levels"].values() for x in lvl.pop("_served", [])]
        qual = None
        if q is not None:
            bpb = q["bits_per_byte"]
            qual = {d: round(statistics.fmean(bpb[m][d] for dd, m in served if dd == d), 4)
                    for d in MIX if any(dd == d for dd, _ in served)}
        merged["configs"][c] = {**r, "quality_bits_per_byte_by_domain": qual}
    merged["goals"] = goals(merged["configs"])
    atomic_json(a.out / "expert_router.json", merged)
    plot(merged["configs"], a.out / "latency_vs_users.png")
    print(json.dumps(merged["goals"], indent=2))


def goals(cfg: dict) -> dict:
    g: dict = {}
    r, gen = cfg.get("routed"), cfg.get("generalist")
    if r and "100" in r["levels"]:
        share = r["levels"]["100"]["route_share_of_mean_latency"]
        g["router_overhead_at_100_users"] = {"share": share, "goal": 0.02,
                                             "met": share is not None and share <= 0.02}
    if r and gen:
        qr, qg = r.get("quality_bits_per_byte_by_domain"), \
            gen.get("quality_bits_per_byte_by_domain")
        if qr and qg:
            g["quality_routed_vs_generalist"] = {
                d: {"routed": qr.get(d), "generalist": qg.get(d),
                    "better": qr.get(d) is not None and qr[d] < qg[d]} for d in qg}
        ratios = {u: (r["levels"][u]["latency_s"]["p95"] / gen["levels"][u]["latency_s"]["p95"])
                  for u in r["levels"] if u in gen["levels"]
                  and r["levels"][u]["latency_s"]["p95"] and gen["levels"][u]["latency_s"]["p95"]}
        g["p95_routed_over_generalist"] = {u: round(x, 3) for u, x in ratios.items()}
        g["p95_goal_1_2x_met_at"] = {u: x <= 1.2 for u, x in ratios.items()}
    if r and "1000" in r["levels"]:
        lvl = r["levels"]["1000"]
        other = {k: v for k, v in lvl["statuses"].items() if k not in ("200", "429")}
        rss = lvl["rss_bytes"]
        g["1000_users"] = {"failures_other_than_429": other, "health_max_s": lvl["health"]["max_s"],
                           "health_failed": lvl["health"]["failed"],
                           "rss_start_max_end_mib": [round(x / 2**20, 1) if x else None
                                                      for x in (rss["start"], rss["max"],
                                                                rss["end"])],
                           "met": not other and (lvl["health"]["max_s"] or 9) <= 1.0
                           and not lvl["health"]["failed"]}
    return g


def plot(cfg: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for i, (c, r) in enumerate(cfg.items()):
        users = [int(u) for u in r["levels"]]
        ax[0].plot(users, [r["levels"][str(u)]["latency_s"]["mean"] for u in users], "o-",
                   color=f"C{i}", label=f"{c} mean")
        ax[0].plot(users, [r["levels"][str(u)]["latency_s"]["p95"] for u in users], "x--",
                   color=f"C{i}", label=f"{c} p95")
        ax[1].plot(users, [r["levels"][str(u)]["tokens_per_s"] for u in users], "o-",
                   color=f"C{i}", label=c)
    for x, t in zip(ax, ("latency of served requests (s)", "completion tokens/s")):
        x.set_xscale("log")
        x.set_xlabel("concurrent users")
        x.set_title(t)
        x.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------ plumbing


def atomic_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["load", "quality", "report", "all"], default="all")
    ap.add_argument("--config", choices=list(CONFIGS), action="append")
    ap.add_argument("--memory-budget", default="700MiB")
    ap.add_argument("--context-length", type=int, default=256)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--min-users", type=int, default=1)
    ap.add_argument("--max-users", type=int, default=1000)
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--level-timeout", type=float, default=180.0)
    ap.add_argument("--load-timeout", type=float, default=300.0)
    ap.add_argument("--quality-docs", type=int, default=6)
    ap.add_argument("--quality-chars", type=int, default=1200)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/expert_router")
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # 1000 client sockets
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 8192)), hard))
    a.out.mkdir(parents=True, exist_ok=True)
    if a.part in ("load", "all"):
        part_load(a.config or DEFAULT_CONFIGS, a)
    if a.part in ("quality", "all"):
        part_quality(a)
    if a.part in ("report", "all"):
        part_report(a)


if __name__ == "__main__":
    main()
