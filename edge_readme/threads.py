"""OpenMP setup so that a runtime loaded or driven from any thread decodes at full speed.

Measured cause (2-core machine, SmolLM2-135M, see docs/readme-batching.md): libgomp keeps the
workers of a team spinning for about 3 ms after every parallel region (GOMP_SPINCOUNT 300000)
while it manages no more threads than there are CPUs, and for only 100 spins when it manages more.
`Engine.load` from the main thread leaves the main thread's team parked, so the engine's worker
runs "oversubscribed" with the short spin; loaded from a thread that then exits (as `serve` does),
the loader's team dies, the worker's team spins for 3 ms after each of the hundreds of small
regions of a decode step, and on a busy machine the spinner takes the core the next region needs
(about 5x slower). Setting OMP_WAIT_POLICY=PASSIVE makes the speed independent of who loaded.

libgomp reads its environment once, when torch loads it, so `prefer_passive_wait` must run before
`import torch`; the package calls it first thing. When torch was imported earlier and the user set
no policy, `Anchor` keeps one parked thread with an OpenMP team, which gives every engine the
main-thread layout whichever thread loaded it. This module knows nothing about models.
"""

from __future__ import annotations

import os
import sys
import threading

_POLICY_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
PASSIVE_APPLIED = False  # True when this process's libgomp was started with our policy


def prefer_passive_wait() -> None:
    """Default OMP_WAIT_POLICY to PASSIVE when torch is not imported yet and the user chose none."""
    global PASSIVE_APPLIED
    if any(v in os.environ for v in _POLICY_VARS):
        return
    if "torch" in sys.modules:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    PASSIVE_APPLIED = True


class Anchor:
    """A parked thread that has run one parallel region, kept for the life of the process.

    Only started when the passive policy could not be applied (torch imported first, no policy
    chosen by the user); its team sleeps and costs no CPU."""

    _lock = threading.Lock()
    _thread: threading.Thread | None = None

    @classmethod
    def ensure(cls) -> None:
        if PASSIVE_APPLIED or any(v in os.environ for v in _POLICY_VARS):
            return
        with cls._lock:
            if cls._thread is not None:
                return
            ready = threading.Event()

            def park() -> None:
                import torch

                n = 1 << 16
                torch.ones(n).add_(torch.ones(n)).sum()  # opens this thread's OpenMP team
                torch.ones(256, 256) @ torch.ones(256, 256)
                ready.set()
                threading.Event().wait()  # parked for the life of the process

            cls._thread = threading.Thread(target=park, name="edge-readme-omp-anchor",
                                           daemon=True)
            cls._thread.start()
            ready.wait()
