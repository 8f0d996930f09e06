"""An engine loaded from a thread (as `serve` loads it) decodes as fast as one loaded from main.

The comparison runs in a fresh interpreter, since the OpenMP layout of a process is fixed by what
ran first: the thread-loaded engine is measured before the main thread ever computes.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edge_readme import registry

pytestmark = [pytest.mark.real, pytest.mark.slow]

SCRIPT = r"""
import json, sys, threading
if sys.argv[2] == "torch-first":
    import torch  # a user script that imports torch before edge-readme
from edge_readme import Engine

def load():
    return Engine.load(sys.argv[1], device="cpu", context_length=256)

def speed(e):
    r = e.generate("The capital of France is", max_tokens=16, ignore_eos=True)
    return r.stats["decode_tokens_per_s"]

box = {}
t = threading.Thread(target=lambda: box.setdefault("e", load()))
t.start(); t.join()
threaded = box["e"]
first = max(speed(threaded) for _ in range(3))  # before the main thread runs any torch op
main = load()
best_main = max(speed(main) for _ in range(3))
print(json.dumps({"thread": first, "main": best_main}))
"""


@pytest.mark.parametrize("order", ["edge-readme-first", "torch-first"])
def test_thread_loaded_engine_decodes_at_main_thread_speed(order, tmp_path):
    path = registry.pull("smollm2-135m")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(path), order], capture_output=True,
                         text=True, timeout=600, check=True)
    speeds = json.loads(out.stdout.strip().splitlines()[-1])
    assert speeds["thread"] >= 0.8 * speeds["main"], speeds
