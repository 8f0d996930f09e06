"""Which activation dtype makes torch's int4/int8 CPU kernels fast on this CPU, by measurement.

On a CPU with AVX512-BF16 the kernels run bfloat16 activations 10-50x faster than float32 ones
(float32 takes a slow path); where bfloat16 has no native instructions (AVX2-only) that may not
hold. So the choice is measured once per process, on a matrix of a decode step's size, unless
EDGE_README_CPU_ACT_DTYPE (bfloat16 or float32) fixes it. Tokens stay exact across budgets and
policies either way: every run of one process uses one dtype.
"""

from __future__ import annotations

import functools
import os
import time

import torch

from edge_readme.errors import EdgeReadmeError

_NAMES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _best_of(fn, reps: int = 5, inner: int = 8) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, time.perf_counter() - t)
    return best


@functools.cache
def cpu_activation_dtype() -> torch.dtype:
    forced = os.environ.get("EDGE_README_CPU_ACT_DTYPE")
    if forced:
        if forced not in _NAMES:
            raise EdgeReadmeError(f"EDGE_README_CPU_ACT_DTYPE={forced!r}: expected bfloat16 "
                                  "or float32")
        return _NAMES[forced]
    return measure()[0]


def measure() -> tuple[torch.dtype, dict[str, float]]:
    """(chosen dtype, seconds per 8 calls of each) for a [1024, 576] int4 matmul at batch 1, with
    the process's threads (changing torch's thread count here made the process abort at exit).
    bfloat16 (half the activation bytes) wins unless float32 is clearly faster."""
    from .q4 import Q4Weight

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 576, generator=gen)
    x = torch.randn(1, 576, generator=gen)
    times = {}
    for name, dt in _NAMES.items():
        q = Q4Weight.quantize(w, dt)
        xd = x.to(dt)
        with torch.inference_mode():
            times[name] = _best_of(lambda: q(xd))
    best = torch.float32 if times["float32"] < 0.8 * times["bfloat16"] else torch.bfloat16
    return best, times
