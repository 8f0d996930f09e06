"""The corpus of hostile model files from issue 13, each built byte by byte from a real tiny file.

Every case must end in a ModelFormatError naming the field at fault (checked in-process with
`match`), and the whole corpus is loaded once more by the capped worker subprocess of
test_fuzz.py (10 s and 1 GiB per case).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from edge_readme.errors import ModelFormatError
from edge_readme.experts_format import read_manifest
from edge_readme.loader import load_model
from edge_readme.tokenizer import Tokenizer
from tests import gguf_bytes as gb
from tests.test_fuzz import Worker, check
from tests.tiny_models import tiny_config, tiny_tensors, write_gguf, write_hf, write_moe

U32, I32, F32, BOOL, STR, ARR, U64 = 4, 5, 6, 7, 8, 9, 10


# name -> (edit of the parsed GGUF, regex the error must match)
GGUF_CASES = {
    "nested-arrays": (lambda p: p.set("x.nested", ARR, gb.nested_array(100_000)), "nested deeper"),
    "n-dims-0": (lambda p: p.tensors[0].__setitem__(1, []), "dimensions"),
    "alignment-0": (lambda p: p.set("general.alignment", U32, 0), "general.alignment"),
    "alignment-array": (lambda p: p.set("general.alignment", ARR, (U32, [32])),
                        "general.alignment"),
    "head-count-0": (lambda p: p.set("llama.attention.head_count", U32, 0),
                     "attention.head_count"),
    "head-count-kv-0": (lambda p: p.set("llama.attention.head_count_kv", U32, 0),
                        "head_count_kv"),
    "head-count-not-dividing": (lambda p: p.drop("llama.rope.dimension_count")
                                .set("llama.attention.head_count", U32, 3), "head_count"),
    "block-count-string": (lambda p: p.set("llama.block_count", STR, "2"), "block_count"),
    "block-count-array": (lambda p: p.set("llama.block_count", ARR, (U32, [2])), "block_count"),
    "block-count-2^32": (lambda p: p.set("llama.block_count", U64, 2**32), "block_count"),
    "block-count-0": (lambda p: p.set("llama.block_count", U32, 0), "block_count"),
    "block-count-too-many": (lambda p: p.set("llama.block_count", U32, 5), "block_count"),
    "rope-theta-nan": (lambda p: p.set("llama.rope.freq_base", F32, float("nan")), "freq_base"),
    "rms-eps-inf": (lambda p: p.set("llama.attention.layer_norm_rms_epsilon", F32,
                                    float("inf")), "rms_epsilon"),
    "bad-bos-with-add-bos": (lambda p: p.set("tokenizer.ggml.bos_token_id", U32, 10**6)
                             .set("tokenizer.ggml.add_bos_token", BOOL, True), "bos_token_id"),
    "merges-malformed": (lambda p: p.set("tokenizer.ggml.merges", ARR, (STR, ["abc", "x"])),
                         "merges"),
    "merges-not-strings": (lambda p: p.set("tokenizer.ggml.merges", ARR, (U32, [1, 2])),
                           "merges"),
    "too-few-tokens": (lambda p: p.set("tokenizer.ggml.tokens", ARR, (STR, ["a", "b"])),
                       "tokenizer.ggml"),
    "integer-tokens": (lambda p: p.set("tokenizer.ggml.tokens", ARR, (U32, list(range(267)))),
                       "tokenizer.ggml.tokens"),
    "duplicate-tokens": (lambda p: p.set("tokenizer.ggml.tokens", ARR,
                                         (STR, ["a"] * 267)), "tokenizer.ggml.tokens"),
    "tensor-misaligned": (lambda p: p.tensors[1].__setitem__(3, 3), "alignment"),
    "tensor-shape-vs-metadata": (lambda p: p.set("llama.attention.head_count", U32, 64),
                                 "shape"),
    "duplicate-key": (lambda p: p.kvs.append(list(p.kvs[1])), "twice"),
}


@pytest.fixture(scope="module")
def base_gguf(tmp_path_factory) -> bytes:
    c = tiny_config(layers=2)
    return write_gguf(tmp_path_factory.mktemp("g") / "m.gguf", c, tiny_tensors(c)).read_bytes()


def _load(path: Path) -> None:
    loaded = load_model(path)
    Tokenizer(loaded.tokenizer, loaded.chat_template).encode("hello")


def write_gguf_case(base: bytes, name: str, folder: Path) -> Path:
    parts = gb.parse(base)
    GGUF_CASES[name][0](parts)
    path = folder / f"{name}.gguf"
    path.write_bytes(gb.build(parts))
    return path


@pytest.mark.parametrize("name", sorted(GGUF_CASES))
def test_hostile_gguf(base_gguf, tmp_path, name):
    path = write_gguf_case(base_gguf, name, tmp_path)
    with pytest.raises(ModelFormatError, match=GGUF_CASES[name][1]) as info:
        _load(path)
    assert str(path) in str(info.value) or "GGUF tokenizer" in str(info.value)


def test_gguf_header_counts_lie(base_gguf, tmp_path):
    parts = gb.parse(base_gguf)
    for n_tensors, n_kv in ((2**24 + 1, None), (None, 2**64 - 1), (5000, None)):
        (tmp_path / "m.gguf").write_bytes(gb.build(parts, n_tensors, n_kv))
        with pytest.raises(ModelFormatError, match="implausible|truncated|corrupt"):
            _load(tmp_path / "m.gguf")


# ---------------------------------------------------------------- Hugging Face folders


def _config_edit(**kw):
    def edit(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(kw)
        (folder / "config.json").write_text(json.dumps(cfg))
    return edit


def _write(name: str, text: str):
    return lambda folder: (folder / name).write_text(text)


def _index(value):
    def edit(folder: Path) -> None:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"model.embed_tokens.weight": value}}))
    return edit


def _fifo(name: str):
    def edit(folder: Path) -> None:
        (folder / name).unlink()
        os.mkfifo(folder / name)
    return edit


def _dev_zero(name: str):
    def edit(folder: Path) -> None:
        (folder / name).unlink()
        (folder / name).symlink_to("/dev/zero")
    return edit


def _nan_norm(folder: Path) -> None:
    from safetensors.torch import load_file

    t = load_file(str(folder / "model.safetensors"))
    t["model.norm.weight"][3] = float("nan")
    save_file(t, str(folder / "model.safetensors"))


HF_CASES = {
    "index-escapes-folder": (_index("../outside.safetensors"), "weight_map"),
    "index-absolute": (_index("/etc/passwd"), "weight_map"),
    "index-not-string": (_index(7), "weight_map"),
    "layers-1e9": (_config_edit(num_hidden_layers=1e9), "num_hidden_layers"),
    "layers-negative": (_config_edit(num_hidden_layers=-2), "num_hidden_layers"),
    "layers-more-than-tensors": (_config_edit(num_hidden_layers=1), "num_hidden_layers"),
    "kv-heads-0": (_config_edit(num_key_value_heads=0), "num_key_value_heads"),
    "kv-heads-not-dividing": (_config_edit(num_key_value_heads=3), "num_key_value_heads"),
    "moe-list": (_config_edit(moe=[1, 2]), "moe"),
    # found by the fuzzer: a MoE config whose shared sizes are missing (one is built per layer)
    "moe-no-shared-sizes": (_config_edit(moe={"num_experts": 2, "shared_sizes": []}),
                            "shared_sizes"),
    "config-not-object": (_write("config.json", "[1, 2, 3]"), "JSON object"),
    "config-deep": (_write("config.json", "[" * 100000 + "]" * 100000), "JSON"),
    "config-fifo": (_fifo("config.json"), "not a regular file"),
    "config-dev-zero": (_dev_zero("config.json"), "not a regular file"),
    "tokenizer-config-dev-zero": (_dev_zero("tokenizer_config.json"), "not a regular file"),
    "tokenizer-json-fifo": (_fifo("tokenizer.json"), "not a regular file"),
    "max-position-1e12": (_config_edit(max_position_embeddings=10**12),
                          "max_position_embeddings"),
    "eos-past-vocab": (_config_edit(eos_token_id=10**6), "eos_token_id"),
    "bos-past-vocab": (_config_edit(bos_token_id=267), "bos_token_id"),
    "rope-theta-nan": (_write("config.json", '{"rope_theta": NaN}'), "missing field|rope"),
    "nan-norm-weight": (_nan_norm, "NaN"),
}


@pytest.fixture(scope="module")
def base_hf(tmp_path_factory) -> Path:
    c = tiny_config(layers=2)
    return write_hf(tmp_path_factory.mktemp("hf") / "m", c, tiny_tensors(c))


def write_hf_case(base: Path, name: str, root: Path) -> Path:
    folder = root / name
    shutil.copytree(base, folder)
    HF_CASES[name][0](folder)
    return folder


@pytest.mark.parametrize("name", sorted(HF_CASES))
def test_hostile_hf_folder(base_hf, tmp_path, name):
    folder = write_hf_case(base_hf, name, tmp_path)
    with pytest.raises(ModelFormatError, match=HF_CASES[name][1]):
        _load(folder)


def test_rope_theta_nan_in_config(base_hf, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(base_hf, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "rope_theta": float("nan"),
                                                    "rms_norm_eps": float("inf")}))
    with pytest.raises(ModelFormatError, match="rope_theta.*finite"):
        _load(folder)


# ---------------------------------------------------------------- experts.json


def _manifest_edit(**kw):
    def edit(folder: Path) -> None:
        m = json.loads((folder / "experts.json").read_text())
        m.update(kw)
        (folder / "experts.json").write_text(json.dumps(m))
    return edit


MOE_CASES = {
    "file-escapes-folder": (_manifest_edit(file="../experts.safetensors"), "'file'"),
    "alignment-0": (_manifest_edit(alignment=0), "alignment"),
    "num-layers-huge": (_manifest_edit(num_layers=10**12), "num_layers"),
    "manifest-dev-zero": (_dev_zero("experts.json"), "not a regular file"),
    "entry-bool": (lambda f: _manifest_edit(experts=[{"layer": True, "expert": 0, "rows": 1,
                                                      "offset": 0, "length": 1,
                                                      "sha256": ""}])(f), r"experts\[0\]"),
}


@pytest.fixture(scope="module")
def base_moe(tmp_path_factory) -> Path:
    return write_moe(tmp_path_factory.mktemp("moe") / "m", num_experts=2, layers=2)


def write_moe_case(base: Path, name: str, root: Path) -> Path:
    folder = root / name
    shutil.copytree(base, folder)
    MOE_CASES[name][0](folder)
    return folder


@pytest.mark.parametrize("name", sorted(MOE_CASES))
def test_hostile_manifest(base_moe, tmp_path, name):
    folder = write_moe_case(base_moe, name, tmp_path)
    with pytest.raises(ModelFormatError, match=MOE_CASES[name][1]):
        read_manifest(folder)


def test_corpus_in_capped_subprocess(base_gguf, base_hf, base_moe, tmp_path):
    """The whole corpus again, each case in the worker under 1 GiB and 10 s."""
    worker = Worker()
    try:
        for name in GGUF_CASES:
            assert check(worker, "model", write_gguf_case(base_gguf, name, tmp_path)) == "typed"
        for name in HF_CASES:
            folder = write_hf_case(base_hf, name, tmp_path / "hf")
            assert check(worker, "model", folder) == "typed", name
        for name in MOE_CASES:
            folder = write_moe_case(base_moe, name, tmp_path / "moe")
            assert check(worker, "manifest", folder) == "typed", name
    finally:
        worker.close()


def test_norm_weights_checked_cheaply():
    t = {"model.norm.weight": torch.ones(4), "x.weight": torch.full((2,), float("nan"))}
    from edge_readme.validate import check_finite_norms

    check_finite_norms(t, "src")  # non-norm NaNs are the weights' business, not reported here
    t["model.norm.weight"][0] = float("inf")
    with pytest.raises(ModelFormatError, match="model.norm.weight"):
        check_finite_norms(t, "src")
