"""The loader reads weights on demand: names and shapes come from the header, a lookup reads one
tensor, big tables convert a block of rows at a time, and a load never holds the whole model in
float32 (measured as peak RSS in a fresh subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from edge_readme.loader import LazyTensors, Rows, load_model, row_source, shape_of
from edge_readme.quant import Q4Weight, Q8Weight, convert
from edge_readme.quant.q4 import encode_plain
from tests.tiny_models import tiny_config, tiny_tensors, write_gguf, write_hf


@pytest.fixture(scope="module")
def tiny():
    c = tiny_config(hidden_size=64, intermediate_size=128)
    return c, tiny_tensors(c)


def small_rows(src: Rows, n: int = 7) -> Rows:
    src.BLOCK = n  # odd block size: the last block is short, and blocks cross row groups
    return src


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_1"])
def test_gguf_rows_equal_the_whole_tensor(tmp_path, tiny, qtype):
    c, t = tiny
    lm = load_model(write_gguf(tmp_path / "m.gguf", c, t, qtype))
    assert isinstance(lm.tensors, LazyTensors)
    name = "model.embed_tokens.weight"
    assert shape_of(lm.tensors, name) == tuple(t[name].shape)
    whole = lm.tensors[name]
    blocks = list(small_rows(row_source(lm.tensors, name)).blocks())
    assert [b.shape[0] for b in blocks][:-1] == [7] * (len(blocks) - 1)
    torch.testing.assert_close(torch.cat(blocks), whole, rtol=0, atol=0)
    assert lm.tensors[name] is not whole  # nothing is cached: a lookup reads again


def test_permuted_qk_rows_are_not_read_in_blocks(tmp_path, tiny):
    c, t = tiny
    lm = load_model(write_gguf(tmp_path / "m.gguf", c, t))
    with pytest.raises(ValueError, match="permuted"):
        next(lm.tensors.rows("model.layers.0.self_attn.q_proj.weight").blocks())
    torch.testing.assert_close(lm.tensors["model.layers.0.self_attn.q_proj.weight"],
                               t["model.layers.0.self_attn.q_proj.weight"])


def test_folder_4bit_matrix_reads_in_blocks(tmp_path, tiny):
    c, t = tiny
    folder = write_hf(tmp_path / "hf", c, t)
    name = "model.embed_tokens.weight"
    stored = {k: v for k, v in t.items() if k != name}
    stored.update({f"{name}.{k}": v for k, v in encode_plain(t[name]).items()})
    save_file({k: v.contiguous() for k, v in stored.items()}, str(folder / "model.safetensors"))
    lm = load_model(folder)
    assert name in lm.tensors and name + ".q4" not in lm.tensors
    assert shape_of(lm.tensors, name) == tuple(t[name].shape)
    whole = lm.tensors[name]
    assert (whole - t[name]).abs().max() < 0.1 * t[name].abs().max()
    torch.testing.assert_close(torch.cat(list(small_rows(lm.tensors.rows(name)).blocks())),
                               whole, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["q4", "q8", "f32", "bf16"])
def test_convert_from_blocks_equals_convert_whole(tmp_path, tiny, fmt):
    c, t = tiny
    lm = load_model(write_gguf(tmp_path / "m.gguf", c, t, "Q4_1"))
    name, cpu = "model.embed_tokens.weight", torch.device("cpu")
    for role in ("embed", "proj"):
        a = convert(lm.tensors[name], fmt, role, cpu)
        b = convert(small_rows(lm.tensors.rows(name), 64), fmt, role, cpu)
        assert type(a) is type(b)
        if isinstance(a, Q4Weight):
            assert torch.equal(a.packed, b.packed) and torch.equal(a.scale_zero, b.scale_zero)
        elif isinstance(a, Q8Weight):
            assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale)
        else:
            assert torch.equal(a, b)


PEAK_PROBE = """
import json, sys, threading, time, psutil, torch
from edge_readme import Engine
torch.set_num_threads(1)
Engine.load(sys.argv[1], device="cpu", context_length=64).close()  # imports, pools, kernels
p = psutil.Process()
base, peak, done = p.memory_info().rss, [0], threading.Event()

def sample():  # the load's peak RSS, sampled every millisecond
    while not done.is_set():
        peak[0] = max(peak[0], p.memory_info().rss)
        time.sleep(0.001)

th = threading.Thread(target=sample)
th.start()
e = Engine.load(sys.argv[2], device="cpu", context_length=64)
done.set()
th.join()
print(json.dumps({"peak_over_base": peak[0] - base, "resident": e.runtime.resident_bytes()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS via /proc")
def test_load_peak_is_far_below_a_float32_copy(tmp_path):
    pytest.importorskip("psutil")
    warm = write_gguf(tmp_path / "warm.gguf", tiny_config(), tiny_tensors(tiny_config()))
    # a 4-bit file whose float32 form is ~200 MiB, most of it one table (a big vocabulary)
    c = tiny_config(layers=4, hidden_size=512, intermediate_size=2048, num_heads=8,
                    num_kv_heads=8, head_dim=64)
    t = tiny_tensors(c)
    t["model.embed_tokens.weight"] = torch.randn(65536, 512) * 0.02
    import dataclasses

    c = dataclasses.replace(c, vocab_size=65536)
    big = write_gguf(tmp_path / "big.gguf", c, t, "Q4_1")
    float32 = sum(v.numel() * 4 for v in t.values())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent),
                                                        os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", PEAK_PROBE, str(warm), str(big)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout.strip().splitlines()[-1])
    # an eager loader holds the whole float32 model (1.0x) plus conversion temporaries
    assert m["peak_over_base"] <= 0.6 * float32, (m, float32)  # measured 0.4-0.5x
