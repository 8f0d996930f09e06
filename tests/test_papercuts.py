"""Small things a new user hit (issue 13): eval --data held out whole, too little text, a
readable --dry-run, Ctrl-D in chat, the budget message for API users, sampler values at the CLI."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from edge_readme import BudgetTooSmallError, Engine
from edge_readme.cli.main import cli
from tests.tiny_models import (
    tiny_config,
    tiny_tensors,
    write_gguf,
    write_moe,
    write_refactor_fixture,
)


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    c = tiny_config()
    return write_gguf(tmp_path_factory.mktemp("m") / "tiny.gguf", c, tiny_tensors(c))


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    return write_moe(tmp_path_factory.mktemp("moe") / "tiny-moe")


def test_dry_run_without_json_is_readable(moe_model):
    r = run("generate", "x", "-m", moe_model, "--dry-run", "--memory-budget", "1GiB")
    assert r.exit_code == 0, r.output
    assert not r.output.lstrip().startswith("{")
    assert "minimum" in r.output and "MiB" in r.output and "slots" in r.output


def test_api_budget_error_names_the_api_argument(moe_model):
    with pytest.raises(BudgetTooSmallError) as info:
        Engine.load(str(moe_model), memory_budget="1KiB", device="cpu")
    assert "memory_budget=" in str(info.value) and "--memory-budget" in str(info.value)


@pytest.mark.parametrize("flag,value", [("--temperature", "1e-40"), ("--seed", str(2 ** 64))])
def test_sampler_values_at_the_cli_are_one_line_errors(gguf_model, flag, value):
    r = run("generate", "x", "-m", gguf_model, "--max-tokens", 2, flag, value)
    assert r.exit_code == 2, r.output
    assert flag.lstrip("-") in r.output and "Traceback" not in r.output


def test_ctrl_d_in_chat_ends_the_line(gguf_model):
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(),
                                                        os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "edge_readme.cli.main", "chat", "-m",
                             str(gguf_model), "--device", "cpu"], stdin=slave, stdout=slave,
                            stderr=slave, env=env, close_fds=True)  # the prompt goes to stderr
    os.close(slave)
    out, deadline, sent = b"", time.monotonic() + 60, False
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    out += os.read(master, 4096)
                except OSError:
                    break
            if not sent and out.endswith(b"> "):
                os.write(master, b"\x04")  # Ctrl-D on an empty line
                sent = True
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert sent, out
    assert out.endswith(b"> \r\n"), out[-40:]


@pytest.fixture(scope="module")
def refactored(tmp_path_factory):
    root = write_refactor_fixture(tmp_path_factory.mktemp("papercuts"), docs_per_domain=8)
    out = root / "moe"
    r = run("refactor", root / "dense", out, "--data", root / "data.jsonl", "--seq-len", 32,
            "--sequences-per-domain", 2, "--router-steps", 3, "--active-fraction", 0.5,
            "--layer-allocation", "uniform", "--json")
    assert r.exit_code == 0, r.output
    return root, out


def test_eval_holds_a_data_file_out_whole(refactored, tmp_path):
    root, out = refactored
    # one paragraph: an 80/20 split would hold out nothing of it
    text = " ".join(["the moon river night she walked softly"] * 40)
    (tmp_path / "heldout.txt").write_text(text)
    r = run("eval", out, "--data", tmp_path / "heldout.txt", "--reference", root / "dense",
            "--seq-len", 32, "--sequences-per-domain", 2, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{"):])
    assert list(report["domains"]) == ["heldout"]


def test_eval_on_too_little_text_is_a_clear_error(refactored, tmp_path):
    root, out = refactored
    (tmp_path / "short.txt").write_text("the moon")
    r = run("eval", out, "--data", tmp_path / "short.txt", "--reference", root / "dense",
            "--seq-len", 32)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and "tokens" in r.output
