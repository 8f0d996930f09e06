"""Fuzzing the model readers: every hostile file ends in a typed error or a load, in bounded time
and memory.

Hypothesis applies structured mutations to real tiny files (GGUF metadata and tensor infos,
config.json, safetensors headers, shard indexes, tokenizer_config.json, experts.json). Each file
is loaded (load_model, the tokenizer, the chat template, then Engine.load and one generated
token; EDGE_README_FUZZ_ENGINE=0 skips the engine) by a worker subprocess whose address space is
capped (RLIMIT_AS, `CASE_MIB` over its baseline); each answer must come within `CASE_SECONDS`.
A hang, a crash, an untyped exception or
a MemoryError fails the test and prints the case.

Examples per format: EDGE_README_FUZZ_EXAMPLES (default 600, about 90 s in all on 2 cores).
The issue's larger run: `EDGE_README_FUZZ_EXAMPLES=10000 pytest tests/test_fuzz.py` (seeded:
`derandomize`, so a run is repeatable; set EDGE_README_FUZZ_SEED to explore other inputs).
"""

from __future__ import annotations

import collections
import copy
import json
import os
import select
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests import gguf_bytes as gb
from tests.tiny_models import tiny_config, tiny_tensors, write_gguf, write_hf, write_moe

EXAMPLES = int(os.environ.get("EDGE_README_FUZZ_EXAMPLES", "600"))
SEED = int(os.environ.get("EDGE_README_FUZZ_SEED", "0"))
CASE_SECONDS = 10.0
CASE_MIB = 1024
HERE = Path(__file__).parent

FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=SEED == 0,
                suppress_health_check=list(HealthCheck), print_blob=True)


class Worker:
    """One long-lived loader subprocess; restarted after a case that kills or hangs it."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]))
        return subprocess.Popen([sys.executable, str(HERE / "fuzz_worker.py"), str(CASE_MIB)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env=env, bufsize=1)

    def load(self, kind: str, path: Path) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        self.proc.stdin.write(json.dumps({"kind": kind, "path": str(path)}) + "\n")
        self.proc.stdin.flush()
        # the first answer also waits for the worker's imports
        ready, _, _ = select.select([self.proc.stdout], [], [], CASE_SECONDS + 30)
        if not ready:
            self.close()
            return {"outcome": "hang", "detail": f"no answer within {CASE_SECONDS} s"}
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            self.proc = None
            return {"outcome": "crash", "detail": f"worker died with exit code {code}"}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()
    print(f"\nfuzz outcomes: {dict(OUTCOMES)}")


OUTCOMES: collections.Counter = collections.Counter()


def check(worker: Worker, kind: str, path: Path) -> str:
    out = worker.load(kind, path)
    OUTCOMES[out["outcome"]] += 1
    if out["outcome"] == "typed":
        OUTCOMES[out["detail"].split(":")[0]] += 1
    assert out["outcome"] in ("ok", "typed"), f"{path}: {out['outcome']}\n{out['detail']}"
    return out["outcome"]


# ---------------------------------------------------------------- values a field can take

EDGE_INTS = [0, 1, 2, 3, -1, 7, 64, 255, 256, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
             2**53, 2**63 - 1, 2**63, 2**64 - 1, 10**9, 10**12]
EDGE_FLOATS = [0.0, -0.0, 1e-40, 1e-300, 1e300, float("nan"), float("inf"), float("-inf"), -1.0,
               0.5, 1e12]
json_scalars = st.one_of(st.none(), st.booleans(), st.sampled_from(EDGE_INTS),
                         st.integers(-10, 300), st.sampled_from(EDGE_FLOATS),
                         st.text(max_size=12), st.sampled_from(["../x", "/etc/passwd", "llama",
                                                                "\ud800", "global", "F32"]))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=8)


def _fits(vtype: int, v) -> bool:
    fmt = gb.SCALARS[vtype]
    try:
        struct.pack("<" + fmt, v)
        return True
    except (struct.error, OverflowError):
        return False


@st.composite
def gguf_value(draw, depth: int = 0):
    """(vtype, value) of any GGUF type, nested arrays included."""
    vtype = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12] + ([9] if depth < 7
                                                                             else [])))
    if vtype == 8:
        return 8, draw(st.text(max_size=12) | st.sampled_from(["gpt2", "llama", "x y", "a b"]))
    if vtype == 9:
        nested = draw(st.integers(0, 3)) == 0
        if nested:
            inner = draw(gguf_value(depth + 1))
            return 9, (inner[0], [inner[1]] * draw(st.integers(0, 3)))
        itype = draw(st.sampled_from([4, 5, 8, 6]))
        items = st.text(max_size=4) if itype == 8 else \
            st.sampled_from([v for v in EDGE_INTS if _fits(itype, v)] or [0]) if itype != 6 \
            else st.sampled_from(EDGE_FLOATS)
        return 9, (itype, draw(st.lists(items, max_size=5)))
    if vtype in (6, 12):
        return vtype, draw(st.sampled_from(EDGE_FLOATS))
    if vtype == 7:
        return 7, draw(st.booleans())
    return vtype, draw(st.sampled_from([v for v in EDGE_INTS if _fits(vtype, v)] or [0]))


# ---------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def base_gguf(tmp_path_factory) -> bytes:
    c = tiny_config(layers=2)
    path = write_gguf(tmp_path_factory.mktemp("g") / "m.gguf", c, tiny_tensors(c))
    return path.read_bytes()


@st.composite
def gguf_ops(draw, keys: list[str], n_tensors: int) -> list[tuple]:
    """1-3 edits of a GGUF: a value set to any type, a key dropped, a tensor info changed, header
    counts lied about, the file cut short, a byte flipped."""
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["set", "set", "set", "drop", "tensor", "counts", "cut",
                                   "flip"]))
        if op == "set":
            key = draw(st.sampled_from(keys + ["general.alignment", "llama.vocab_size"]))
            ops.append(("set", key, *draw(gguf_value())))
        elif op == "drop":
            ops.append(("drop", draw(st.sampled_from(keys))))
        elif op == "tensor":
            i = draw(st.integers(0, n_tensors - 1))
            field = draw(st.sampled_from(["dims", "qtype", "offset", "name"]))
            value = draw({
                "dims": st.lists(st.sampled_from([0, 1, 2, 64, 267, 2**32, 2**63]), max_size=6),
                "qtype": st.sampled_from([0, 1, 2, 8, 12, 30, 39, 2**31]),
                "offset": st.sampled_from([0, 1, 32, 2**40, 2**64 - 32]),
                "name": st.sampled_from(["blk.9.attn_q.weight", "token_embd.weight", "",
                                         "blk.4294967296.ffn_up.weight"])}[field])
            ops.append(("tensor", i, field, value))
        elif op == "counts":
            ops.append(("counts", draw(st.sampled_from([0, 1, 2**24 + 1, 2**64 - 1])),
                        draw(st.sampled_from([0, 1, 21, 2**24]))))
        elif op == "cut":
            ops.append(("cut", draw(st.floats(0, 1))))
        else:
            ops.append(("flip", draw(st.integers(0, 12000)), draw(st.integers(0, 255))))
    return ops


def apply_gguf(raw: bytes, ops: list[tuple]) -> bytes:
    parts, counts, tail = gb.parse(raw), (None, None), []
    fields = ["name", "dims", "qtype", "offset"]
    for op in ops:
        if op[0] == "set":
            parts.set(op[1], op[2], op[3])
        elif op[0] == "drop":
            parts.drop(op[1])
        elif op[0] == "tensor":
            parts.tensors[op[1]][fields.index(op[2])] = op[3]
        elif op[0] == "counts":
            counts = op[1:]
        else:
            tail.append(op)
    data = gb.build(parts, *counts)
    for op in tail:
        if op[0] == "cut":
            data = data[:int(len(data) * op[1])]
        elif data:
            at = op[1] % len(data)
            data = data[:at] + bytes([op[2]]) + data[at + 1:]
    return data


def test_fuzz_gguf(worker, base_gguf, tmp_path):
    parts = gb.parse(base_gguf)
    keys = [kv[0] for kv in parts.kvs]

    @FUZZ
    @seed(SEED)
    @given(ops=gguf_ops(keys, len(parts.tensors)))
    def run(ops):
        path = tmp_path / "case.gguf"
        path.write_bytes(apply_gguf(base_gguf, ops))
        check(worker, "model", path)

    run()


# ---------------------------------------------------------------- Hugging Face folders


@pytest.fixture(scope="module")
def base_hf(tmp_path_factory) -> Path:
    c = tiny_config(layers=2)
    return write_hf(tmp_path_factory.mktemp("hf") / "m", c, tiny_tensors(c))


@st.composite
def json_mutation(draw, obj):
    """A copy of a JSON object with 1-3 fields set, dropped or nested into."""
    obj = copy.deepcopy(obj)
    for _ in range(draw(st.integers(1, 3))):
        target = obj
        while isinstance(target, dict) and target and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(target)))
            if not isinstance(target[key], (dict, list)) or not target[key]:
                break
            target = target[key]
            if isinstance(target, list):
                i = draw(st.integers(0, len(target) - 1))
                if isinstance(target[i], dict):
                    target = target[i]
                else:
                    target[i] = draw(json_values)
                    break
        if not isinstance(target, dict):
            continue
        keys = sorted(target) + ["moe", "head_dim", "eos_token_id"]
        key = draw(st.sampled_from(keys))
        if draw(st.integers(0, 4)) == 0:
            target.pop(key, None)
        else:
            target[key] = draw(json_values)
    return obj


def _dumps(obj) -> bytes:
    text = json.dumps(obj, allow_nan=True)
    return text.encode("utf-8", "surrogatepass")


@st.composite
def safetensors_op(draw, names: list[str]) -> tuple:
    op = draw(st.sampled_from(["entry", "entry", "length", "cut"]))
    if op == "entry":
        return ("entry", draw(st.sampled_from(names)),
                draw(st.sampled_from(["dtype", "shape", "data_offsets", "whole"])),
                draw(st.sampled_from(["F32", "F16", "I64", "XX", [], [1], [64, 2**40],
                                      [0, 2**63], [-1, 4], [4, 0], None, 7, {}])))
    if op == "length":
        return ("length", draw(st.sampled_from([0, 1, -1, 1, 2**40, 2**64 - 1])))
    return ("cut", draw(st.floats(0, 1)))


def apply_safetensors(raw: bytes, op: tuple) -> bytes:
    n = struct.unpack_from("<Q", raw)[0]
    if op[0] == "length":
        value = op[1] if op[1] >= 0 else n + op[1]
        return struct.pack("<Q", value) + raw[8:]
    if op[0] == "cut":
        return raw[:int(len(raw) * op[1])]
    header = json.loads(raw[8:8 + n])
    if op[2] == "whole" or not isinstance(header.get(op[1]), dict):
        header[op[1]] = op[3]
    else:
        header[op[1]][op[2]] = op[3]
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + raw[8 + n:]


def st_names(path: Path) -> list[str]:
    raw = path.read_bytes()
    return sorted(json.loads(raw[8:8 + struct.unpack_from("<Q", raw)[0]]))


@st.composite
def hf_case(draw, base: Path, names: list[str]):
    """(file name, op) for one file of the folder; `apply_case` writes it."""
    target = draw(st.sampled_from(["config.json", "config.json", "tokenizer_config.json",
                                   "model.safetensors", "index", "config-top"]))
    if target == "config-top":
        return "config.json", ("replace", draw(json_values))
    if target == "index":
        weight_map = {"model.embed_tokens.weight": draw(st.sampled_from(
            ["model.safetensors", "../m/model.safetensors", "/etc/passwd", "missing.safetensors",
             "", "."])) if draw(st.booleans()) else draw(json_values)}
        return "model.safetensors.index.json", ("replace", {"weight_map": weight_map})
    if target == "model.safetensors":
        return target, draw(safetensors_op(names))
    return target, ("replace", draw(json_mutation(json.loads((base / target).read_text()))))


def apply_case(base: Path, folder: Path, name: str, op: tuple) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(base, folder)
    if op[0] == "replace":
        (folder / name).write_bytes(_dumps(op[1]))
    else:
        (folder / name).write_bytes(apply_safetensors((base / name).read_bytes(), op))


def test_fuzz_hf_folder(worker, base_hf, tmp_path):
    names = st_names(base_hf / "model.safetensors")

    @FUZZ
    @seed(SEED)
    @given(case=hf_case(base_hf, names))
    def run(case):
        apply_case(base_hf, tmp_path / "case", *case)
        check(worker, "model", tmp_path / "case")

    run()


# ---------------------------------------------------------------- experts.json


@pytest.fixture(scope="module")
def base_moe(tmp_path_factory) -> Path:
    return write_moe(tmp_path_factory.mktemp("moe") / "m", num_experts=2, layers=2)


@st.composite
def moe_case(draw, base: Path, names: list[str]):
    target = draw(st.sampled_from(["experts.json", "experts.json", "experts.safetensors",
                                   "config.json"]))
    if target == "experts.safetensors":
        return target, draw(safetensors_op(names))
    return target, ("replace", draw(json_mutation(json.loads((base / target).read_text()))))


def test_fuzz_experts_manifest(worker, base_moe, tmp_path):
    names = st_names(base_moe / "experts.safetensors")

    @FUZZ
    @seed(SEED)
    @given(case=moe_case(base_moe, names))
    def run(case):
        apply_case(base_moe, tmp_path / "case", *case)
        engine = os.environ.get("EDGE_README_FUZZ_ENGINE", "1") == "1"  # reads the experts too
        kind = "manifest" if case[0].startswith("experts") and not engine else "model"
        check(worker, kind, tmp_path / "case")

    run()


def test_fuzz_bases_load(worker, base_gguf, base_hf, base_moe, tmp_path):
    """The unmutated files load: the fuzz tests start from working inputs."""
    (tmp_path / "m.gguf").write_bytes(base_gguf)
    assert check(worker, "model", tmp_path / "m.gguf") == "ok"
    assert check(worker, "model", base_hf) == "ok"
    assert check(worker, "manifest", base_moe) == "ok"
    assert check(worker, "model", base_moe) == "ok"
