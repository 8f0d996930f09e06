"""Lookup tables left in the model file (`--embeddings file`, the default): a token embedding with
a separate output head and the router's embedding are read by row, cost nothing in the plan, and
give exactly the tokens of the in-memory tables."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from edge_readme import Engine, registry
from edge_readme.errors import EdgeReadmeError, ModelFormatError
from edge_readme.loader import load_model, row_file
from edge_readme.rowfile import RowFile, safetensors_rows
from tests.tiny_models import tiny_config, tiny_tensors, write_gguf, write_hf, write_moe

EMBED = "model.embed_tokens.weight"
IDS = [5, 0, 5, 17, 18, 19, 3, 200, 1]  # repeats, a run of neighbours, both ends of the order


@pytest.fixture(scope="module")
def untied():
    c = tiny_config(tie_embeddings=False)
    return c, tiny_tensors(c, seed=3)


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_1", "Q5_0"])
def test_gguf_rows_equal_the_loaders_rows(tmp_path, untied, qtype):
    c, t = untied
    lm = load_model(write_gguf(tmp_path / "m.gguf", c, t, qtype))
    rows = row_file(lm.tensors, EMBED)
    assert rows is not None and rows.shape == tuple(t[EMBED].shape)
    whole = lm.tensors[EMBED]
    assert torch.equal(torch.from_numpy(rows.read(IDS)), whole[IDS])
    rows.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_safetensors_rows_equal_the_loaders_rows(tmp_path, untied, dtype):
    c, t = untied
    folder = write_hf(tmp_path / "m", c, {k: v.to(dtype) for k, v in t.items()})
    lm = load_model(folder)
    rows = row_file(lm.tensors, EMBED)
    assert rows is not None and rows.kind == {torch.float32: "F32", torch.float16: "F16",
                                              torch.bfloat16: "BF16"}[dtype]
    assert torch.equal(torch.from_numpy(rows.read(IDS)), lm.tensors[EMBED][IDS])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert q in safetensors_rows(folder / "model.safetensors")  # every 2-D float is locatable,
    assert row_file(lm.tensors, q) is None  # but only lookup tables are offered
    rows.close()


def test_a_row_outside_the_table_is_refused(tmp_path, untied):
    c, t = untied
    rows = row_file(load_model(write_hf(tmp_path / "m", c, t)).tensors, EMBED)
    with pytest.raises(IndexError):
        rows.read([c.vocab_size])
    with pytest.raises(IndexError):
        rows.read([-1])


def greedy(path, prompt="hello world", **kw) -> tuple[list[int], int]:
    with Engine.load(str(path), device="cpu", context_length=128, threads=1, **kw) as e:
        out = e.generate(prompt, max_tokens=12, temperature=0.0)
        return list(out.token_ids), e.runtime.plan.dense_bytes


@pytest.mark.parametrize("weights", ["q4", "q8", "f32", "bf16"])
@pytest.mark.parametrize("form", ["gguf", "hf"])
def test_untied_embedding_in_file_gives_the_same_tokens(tmp_path, untied, weights, form):
    c, t = untied
    path = write_gguf(tmp_path / "m.gguf", c, t, "Q8_0") if form == "gguf" \
        else write_hf(tmp_path / "m", c, t)
    mem, mem_bytes = greedy(path, weights=weights, embeddings="memory")
    got, file_bytes = greedy(path, weights=weights, embeddings="file")
    assert got == mem
    item = {"q4": 1, "q8": 1, "f32": 4, "bf16": 2}[weights]  # int8 rows for q4 and q8
    assert mem_bytes - file_bytes >= c.vocab_size * c.hidden_size * item  # the table left


def test_router_embedding_in_file_gives_the_same_tokens(tmp_path):
    folder = write_moe(tmp_path / "moe", num_experts=4)
    c = load_model(folder).config
    ref, ref_bytes = greedy(folder, embeddings="memory")
    got, file_bytes = greedy(folder, embeddings="file")
    assert got == ref
    assert ref_bytes - file_bytes == c.vocab_size * c.moe.router.dim * 4  # the float32 table
    for mode in ("file", "memory"):  # offloaded at the smallest budget that runs
        assert greedy(folder, embeddings=mode, memory_budget=_min_budget(folder, mode))[0] == ref


def _min_budget(folder, mode: str) -> int:
    from edge_readme.runtime import dry_run_plan

    plan = dry_run_plan(str(folder), {"context_length": 128, "embeddings": mode})
    return plan["minimum_bytes"]


def test_embeddings_flag_is_checked(tmp_path):
    folder = write_moe(tmp_path / "moe")
    with pytest.raises(EdgeReadmeError, match="--embeddings"):
        Engine.load(str(folder), device="cpu", embeddings="disk")


def test_a_file_cut_short_after_loading_is_a_clear_error(tmp_path, untied):
    c, t = untied
    path = write_gguf(tmp_path / "m.gguf", c, t, "F32")
    e = Engine.load(str(path), device="cpu", context_length=64, embeddings="file")
    try:
        rows = e.runtime.in_file[EMBED]
        os.truncate(path, rows.offset + rows.row_nbytes)  # only row 0 is left
        with pytest.raises(ModelFormatError, match="truncated"):
            e.generate("hello world", max_tokens=2, temperature=0.0)
    finally:
        e.close()
    assert rows._fd is None  # close() let the descriptor go


def test_reads_do_not_map_the_file(tmp_path, untied):
    """The rows come from pread on a descriptor: no mapping of the model file outlives the load,
    so the process's RSS does not carry the pages the build read."""
    c, t = untied
    path = write_gguf(tmp_path / "m.gguf", c, t, "F32")
    with Engine.load(str(path), device="cpu", context_length=64) as e:
        e.generate("hello", max_tokens=2, temperature=0.0)
        with open(f"/proc/{os.getpid()}/maps") as fh:
            assert str(path) not in fh.read()


def test_rowfile_decodes_bf16_exactly(tmp_path):
    x = torch.randn(6, 8).to(torch.bfloat16)
    raw = x.view(torch.int16).numpy().tobytes()
    (tmp_path / "t.bin").write_bytes(b"\0" * 3 + raw)
    r = RowFile(tmp_path / "t.bin", 3, 16, (6, 8), "BF16")
    assert np.array_equal(r.read([4, 1]), x.float()[[4, 1]].numpy())
    r.close()


# ---------------------------------------------------------------- real models


@pytest.mark.real
@pytest.mark.slow
def test_default_moe_same_tokens_with_router_table_in_file():
    path = registry.pull("smollm2-135m-readme")
    mem, mem_bytes = greedy(path, "The capital of France is", embeddings="memory")
    got, file_bytes = greedy(path, "The capital of France is", embeddings="file")
    assert got == mem
    c = load_model(path).config
    assert mem_bytes - file_bytes == c.vocab_size * c.moe.router.dim * 4


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-readme"])
def test_qwen_same_tokens_with_tables_in_file(name):
    path = registry.pull(name)
    mem, mem_bytes = greedy(path, "def add(a, b):", embeddings="memory")
    got, file_bytes = greedy(path, "def add(a, b):", embeddings="file")
    assert got == mem
    c = load_model(path).config
    assert mem_bytes - file_bytes >= c.vocab_size * c.hidden_size  # >= 130 MiB of int8 rows


def test_cli_flag_moves_the_tables_in_and_out_of_the_plan(tmp_path, untied):
    import json

    from click.testing import CliRunner

    from edge_readme.cli.main import cli

    c, t = untied
    path = write_gguf(tmp_path / "m.gguf", c, t, "Q8_0")

    def dense(*flags) -> int:
        r = CliRunner().invoke(cli, ["generate", "-m", str(path), "--dry-run", "--json",
                                     "--context-length", "64", *flags, "hi"])
        assert r.exit_code == 0, r.output
        return json.loads(r.output)["dense_bytes"]

    assert dense() == dense("--embeddings", "file") < dense("--embeddings", "memory")
    r = CliRunner().invoke(cli, ["generate", "-m", str(path), "--embeddings", "disk", "hi"])
    assert r.exit_code == 2 and "Traceback" not in r.output
