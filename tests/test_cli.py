"""The command line through click's CliRunner: output, JSON, one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edge_readme.cli.main import cli
from tests.tiny_models import tiny_config, tiny_tensors, write_gguf, write_moe


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    c = tiny_config()
    return write_gguf(tmp_path_factory.mktemp("m") / "tiny.gguf", c, tiny_tensors(c))


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    return write_moe(tmp_path_factory.mktemp("moe") / "tiny-moe")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_generate_json(gguf_model):
    r = run("generate", "the theory", "-m", gguf_model, "--max-tokens", 5, "--json",
            "--device", "cpu")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert len(out["token_ids"]) <= 5 and isinstance(out["text"], str)
    assert out["stats"]["prompt_tokens"] > 0 and "decode_tokens_per_s" in out["stats"]


def test_generate_streams_text_and_is_deterministic(gguf_model):
    a = run("generate", "the theory", "-m", gguf_model, "--max-tokens", 6)
    b = run("generate", "the theory", "-m", gguf_model, "--max-tokens", 6)
    assert a.exit_code == 0 and a.output == b.output


def test_generate_chat_and_sampling_flags(gguf_model):
    r = run("generate", "hi", "-m", gguf_model, "--chat", "--system", "be brief",
            "--max-tokens", 4, "--temperature", 0.8, "--top-p", 0.9, "--top-k", 20, "--seed", 1,
            "--threads", 1, "--dtype", "bfloat16", "--json")
    assert r.exit_code == 0, r.output


def test_moe_generate_reports_cache_counters(moe_model):
    r = run("generate", "the theory", "-m", moe_model, "--max-tokens", 6, "--json",
            "--memory-budget", "auto", "--policy", "lru")
    assert r.exit_code == 0, r.output
    cache = json.loads(r.output)["stats"]["cache"]
    for key in ("hits", "misses", "prefetch_hits", "bytes_read", "stall_seconds",
                "peak_resident_bytes", "hit_ratio"):
        assert key in cache


def test_dry_run_prints_the_plan(moe_model):
    r = run("generate", "x", "-m", moe_model, "--dry-run", "--json", "--memory-budget", "1GiB")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output)
    assert {"minimum_bytes", "all_resident_bytes", "slots"} <= plan.keys()


def test_info(gguf_model, moe_model):
    r = run("info", gguf_model, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["layers"] == 3 and {"embeddings", "attention", "ffn"} <= d["bytes"].keys()
    r = run("info", moe_model)
    assert r.exit_code == 0 and "experts" in r.output


@pytest.mark.parametrize("args,match", [
    (["generate", "x", "-m", "/no/such.gguf"], "no such file"),
    (["generate", "x", "-m", "no-such-model"], "unknown model"),
    (["generate", "x", "--memory-budget", "12XB", "-m", "smollm2-135m"], "memory budget"),
    (["info", "/no/such/folder/"], "no such file"),
])
def test_errors_are_one_line_with_exit_code_2(args, match):
    r = run(*args)
    assert r.exit_code == 2, r.output
    assert match in r.output.lower()
    assert "Traceback" not in r.output and r.output.strip().count("\n") == 0


def test_budget_below_minimum_states_the_minimum(moe_model):
    r = run("generate", "x", "-m", moe_model, "--memory-budget", "1MiB")
    assert r.exit_code == 2
    assert "minimum" in r.output and "--memory-budget" in r.output


def test_nonsense_flags_are_refused(gguf_model):
    r = run("generate", "x", "-m", gguf_model, "--policy", "random")
    assert r.exit_code == 2 and "random" in r.output
    r = run("generate", "x", "-m", gguf_model, "--temperature", -1)
    assert r.exit_code == 2
    r = run("generate", "x", "-m", gguf_model, "--device", "tpu")
    assert r.exit_code == 2 and "device" in r.output


def test_chat_session(gguf_model):
    r = CliRunner().invoke(cli, ["chat", "-m", str(gguf_model), "--temperature", "0",
                                 "--max-tokens", "4"],
                           input="hello\n/stats\n/reset\nagain\n/bogus\n/exit\n")
    assert r.exit_code == 0, r.output
    assert "memory:" in r.output and "tok/s" in r.output
