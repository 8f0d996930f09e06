"""Soak test (manual; pytest does not collect it): API threads and HTTP clients mixing streaming,
cancels and disconnects against one engine for a long time. File handles, threads and RSS must
stay flat, and every completed greedy answer must equal its solo answer.

    python tests/soak.py                       # 20 minutes, the tiny MoE built in a temp folder
    python tests/soak.py --minutes 2           # a quick run
    python tests/soak.py --model smollm2-135m-readme --memory-budget 600MiB --minutes 20

Writes soak.json (samples, counts, verdict) and soak.png (fds, threads, RSS over time) to --out;
exits 1 when a check fails. Needs the serve extra (starlette, uvicorn), httpx and psutil.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_readme import Engine  # noqa: E402
from edge_readme.errors import EdgeReadmeError  # noqa: E402
from edge_readme.server import create_app  # noqa: E402
from edge_readme.server.app import _server  # noqa: E402

PROMPTS = ["the theory of heat", "a tiny test, then another one", "on and on", "once upon",
           "def f(x):", "the moon river"]
MAX_TOKENS = 24


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.n: dict[str, int] = {}
        self.mismatches: list[str] = []

    def add(self, key: str) -> None:
        with self.lock:
            self.n[key] = self.n.get(key, 0) + 1

    def mismatch(self, what: str) -> None:
        with self.lock:
            self.mismatches.append(what)


def api_worker(engine: Engine, solo: dict, stop: threading.Event, counts: Counts,
               seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        prompt = rng.choice(PROMPTS)
        try:
            if rng.random() < 0.3:  # a stream cancelled after a few chunks
                stream = engine.stream(prompt, max_tokens=MAX_TOKENS)
                for i, _ in enumerate(stream):
                    if i == rng.randint(0, 5):
                        stream.cancel()
                stream.collect()
                counts.add("api_cancelled")
            else:
                text = engine.generate(prompt, max_tokens=MAX_TOKENS).text
                counts.add("api_completed")
                if text != solo[prompt]:
                    counts.mismatch(f"api {prompt!r}: {text!r} != {solo[prompt]!r}")
        except EdgeReadmeError as e:
            counts.add(f"api_error {type(e).__name__}")


def http_worker(base: str, solo: dict, stop: threading.Event, counts: Counts, seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=base, timeout=120) as c:
        while not stop.is_set():
            prompt = rng.choice(PROMPTS)
            body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
            r = rng.random()
            try:
                if r < 0.5:
                    got = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
                    counts.add("http_completed")
                    if got != solo[prompt]:
                        counts.mismatch(f"http {prompt!r}: {got!r} != {solo[prompt]!r}")
                elif r < 0.8:  # a streaming client that disconnects after a few events
                    with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
                        for i, _ in enumerate(s.iter_lines()):
                            if i >= rng.randint(1, 6):
                                break
                    counts.add("http_disconnected")
                else:  # a full stream
                    with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
                        text = "".join(json.loads(line[6:])["choices"][0]["text"]
                                       for line in s.iter_lines()
                                       if line.startswith("data: {"))
                    counts.add("http_streamed")
                    if text != solo[prompt]:
                        counts.mismatch(f"sse {prompt!r}: {text!r} != {solo[prompt]!r}")
            except httpx.HTTPError as e:
                counts.add(f"http_error {type(e).__name__}")


def sample(proc: psutil.Process, t0: float) -> dict:
    return {"t": round(time.monotonic() - t0, 1), "fds": proc.num_fds(),
            "threads": proc.num_threads(), "rss_mib": round(proc.memory_info().rss / 2**20, 1)}


def flat(samples: list[dict], key: str, slack: float) -> tuple[bool, float, float]:
    """Mean of the last fifth against the mean of the second fifth (after warm-up)."""
    n = len(samples)
    early = [s[key] for s in samples[n // 5: 2 * n // 5]] or [samples[0][key]]
    late = [s[key] for s in samples[-max(1, n // 5):]]
    a, b = sum(early) / len(early), sum(late) / len(late)
    return b - a <= slack, a, b


def plot(samples: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    t = [s["t"] / 60 for s in samples]
    for ax, key, label in zip(axes, ("fds", "threads", "rss_mib"),
                              ("open file descriptors", "threads", "RSS (MiB)")):
        ax.plot(t, [s[key] for s in samples])
        ax.set_ylabel(label)
    axes[-1].set_xlabel("minutes")
    fig.suptitle("edge-readme soak")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: a tiny MoE built in a temp folder")
    ap.add_argument("--memory-budget", default=None)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--api-threads", type=int, default=4)
    ap.add_argument("--http-clients", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    model = args.model
    if model is None:
        from tests.tiny_models import write_moe

        model = str(write_moe(Path(tempfile.mkdtemp()) / "tiny-moe", num_experts=4, layers=3))
    engine = Engine.load(model, device="cpu", memory_budget=args.memory_budget,
                         context_length=512)
    solo = {p: engine.generate(p, max_tokens=MAX_TOKENS).text for p in PROMPTS}
    server = _server(create_app(engine, model_name="soak"), "127.0.0.1", 0, "warning")
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    stop, counts, proc, t0 = threading.Event(), Counts(), psutil.Process(), time.monotonic()
    workers = [threading.Thread(target=api_worker, args=(engine, solo, stop, counts, i))
               for i in range(args.api_threads)]
    workers += [threading.Thread(target=http_worker, args=(base, solo, stop, counts, 100 + i))
                for i in range(args.http_clients)]
    for w in workers:
        w.start()
    samples = [sample(proc, t0)]
    period = max(1.0, args.minutes * 60 / 240)
    while time.monotonic() - t0 < args.minutes * 60:
        time.sleep(period)
        samples.append(sample(proc, t0))
        print(f"\r{samples[-1]} {dict(counts.n)}", end="", file=sys.stderr, flush=True)
    stop.set()
    for w in workers:
        w.join(120)
    server.should_exit = True
    checks = {"fds": flat(samples, "fds", 8), "threads": flat(samples, "threads", 4),
              "rss_mib": flat(samples, "rss_mib", 64)}
    ok = all(c[0] for c in checks.values()) and not counts.mismatches \
        and counts.n.get("api_completed", 0) + counts.n.get("http_completed", 0) > 0
    report = {"model": model, "minutes": args.minutes, "counts": counts.n,
              "mismatches": counts.mismatches[:20],
              "checks": {k: {"flat": c[0], "early": round(c[1], 1), "late": round(c[2], 1)}
                         for k, c in checks.items()},
              "ok": ok, "samples": samples}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(report, indent=1))
    plot(samples, args.out / "soak.png")
    print(f"\n{json.dumps({k: v for k, v in report.items() if k != 'samples'}, indent=1)}")
    engine.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
