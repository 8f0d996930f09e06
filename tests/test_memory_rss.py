"""Process memory against the budget on CPU, measured in a fresh subprocess: the RSS a load adds
stays near the runtime's resident bytes (the loader's float32 copies are freed and the heap
trimmed), and close() gives the memory back while the engine object still exists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_models import tiny_config, tiny_tensors, write_gguf

PROBE = """
import gc, json, sys, psutil, torch
from edge_readme import Engine
torch.set_num_threads(1)
p = psutil.Process()
rss = lambda: p.memory_info().rss
Engine.load(sys.argv[1], device="cpu", context_length=64).close()  # warm imports and pools
gc.collect()
base = rss()
e = Engine.load(sys.argv[1], device="cpu", context_length=64)
resident = e.runtime.resident_bytes()
e.generate("the theory", max_tokens=4)
loaded = rss() - base
e.close()
gc.collect()
print(json.dumps({"resident": resident, "loaded": loaded, "closed": rss() - base}))
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    # ~100 MiB of float32 weights: large enough that allocator noise does not decide the test
    c = tiny_config(layers=6, hidden_size=512, intermediate_size=2048, num_heads=8,
                    num_kv_heads=8, head_dim=64)
    return write_gguf(tmp_path_factory.mktemp("rss") / "m.gguf", c, tiny_tensors(c))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS via /proc, glibc heap")
def test_load_and_close_keep_rss_near_the_resident_bytes(model):
    pytest.importorskip("psutil")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent),
                                                        os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", PROBE, str(model)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 1 << 20
    assert m["loaded"] <= 1.2 * m["resident"] + 16 * mib, m  # was 1.5x: float32 copies kept
    assert m["closed"] <= 0.25 * m["resident"] + 32 * mib, m  # close() used to free nothing
