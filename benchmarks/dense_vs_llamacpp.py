"""Dense decode and prefill speed: our engine in each weight format vs llama.cpp, one run.

Same GGUF, same thread count, same prompt; repetitions are interleaved so machine noise hits every
variant alike. Prints tokens/s and ours/llama.cpp ratios, writes JSON (--out).

    python benchmarks/dense_vs_llamacpp.py --threads 2 --rounds 3 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch

PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes "
          "Gutenberg combined movable metal type, oil-based ink and a wooden press.")


def build_ours(model_path: str, variant: str, length: int, threads: int):
    """Our engine in one weight format: q4, q8, bf16, f16 or f32."""
    from edge_readme import Engine

    return Engine.load(model_path, device="cpu", context_length=length, threads=threads,
                       weights=variant)


def run_ours(engine, ids: list[int], n: int) -> tuple[float, float]:
    engine.reset()  # no prefix reuse between rounds: every round prefills the whole prompt
    stats = engine.generate(ids, max_tokens=n, ignore_eos=True).stats
    return stats["prefill_tokens_per_s"], stats["decode_tokens_per_s"]


def run_peer(llm, ids: list[int], n: int) -> tuple[float, float]:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    for _ in range(n):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    t2 = time.perf_counter()
    return len(ids) / (t1 - t0), n / (t2 - t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="registry name or .gguf file")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens per repetition")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="f32,bf16,q8,q4")
    ap.add_argument("--out", default="dense_vs_llamacpp.json")
    a = ap.parse_args()

    from llama_cpp import Llama

    from edge_readme.loader import load_model
    from edge_readme.registry import resolve
    from edge_readme.tokenizer import Tokenizer

    a.model = str(resolve(a.model))
    torch.set_num_threads(a.threads)
    lm = load_model(a.model)
    ids = Tokenizer(lm.tokenizer).encode(PROMPT)
    length = len(ids) + a.tokens + 1
    llm = Llama(a.model, n_ctx=max(256, length), n_threads=a.threads, n_threads_batch=a.threads,
                verbose=False)
    runners = {"llama.cpp": lambda: run_peer(llm, ids, a.tokens)}
    for v in a.variants.split(","):
        engine = build_ours(a.model, v, length, a.threads)
        runners[v] = (lambda e=engine: run_ours(e, ids, a.tokens))
    for run in runners.values():  # warm-up: page in weights, pick kernels
        run()
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in runners}
    for _ in range(a.rounds):
        for k, run in runners.items():
            samples[k].append(run())

    peer_p = statistics.median(s[0] for s in samples["llama.cpp"])
    peer_d = statistics.median(s[1] for s in samples["llama.cpp"])
    result = {"model": a.model, "threads": a.threads, "prompt_tokens": len(ids),
              "decode_tokens": a.tokens, "rounds": a.rounds, "torch": torch.__version__,
              "variants": {}}
    print(f"{'variant':10s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'prefill x':>10s} "
          f"{'decode x':>9s}")
    for k, s in samples.items():
        p, d = statistics.median(x[0] for x in s), statistics.median(x[1] for x in s)
        result["variants"][k] = {"prefill_tok_s": p, "decode_tok_s": d,
                                 "prefill_ratio": p / peer_p, "decode_ratio": d / peer_d,
                                 "samples": s}
        print(f"{k:10s} {p:14.1f} {d:13.1f} {p / peer_p:10.2f} {d / peer_d:9.2f}")
    out = os.path.abspath(a.out)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
