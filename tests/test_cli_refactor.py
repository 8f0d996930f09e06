"""`edge-readme refactor` and `edge-readme eval` end to end on a tiny dense model."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edge_readme.cli.main import cli
from tests.tiny_models import REFACTOR_WORDS as WORDS
from tests.tiny_models import write_refactor_fixture


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_refactor_fixture(tmp_path_factory.mktemp("cli-refactor"), docs_per_domain=8)


def test_refactor_then_eval_then_generate(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_README_HOME", str(tmp_path / "home"))
    out = tmp_path / "moe"
    args = ["refactor", str(tiny / "dense"), str(out), "--data", str(tiny / "data.jsonl"),
            "--seq-len", "32", "--sequences-per-domain", "3", "--router-steps", "5",
            "--active-fraction", "0.5", "--layer-allocation", "uniform", "--json"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert (out / "experts.json").exists() and (out / "config.json").exists()
    assert json.loads((out / "refactor.json").read_text())["allocation"] == "uniform"
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and "exists" in r.output and "--force" in r.output
    r = CliRunner().invoke(cli, ["eval", str(out), "--data", str(tiny / "data.jsonl"),
                                 "--reference", str(tiny / "dense"), "--seq-len", "32",
                                 "--sequences-per-domain", "1", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{"):])
    assert set(report["domains"]) == set(WORDS)
    assert all(row["ratio"] > 0 for row in report["domains"].values())
    r = CliRunner().invoke(cli, ["generate", "the moon", "-m", str(out), "--max-tokens", "4",
                                 "--memory-budget", "auto", "--json"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("extra,match", [(["--active-fraction", "0"], "active fraction"),
                                         (["--data", "/no/such.txt"], "no/such.txt"),
                                         (["--layer-allocation", "even"], "sensitivity")])
def test_refactor_bad_input(tiny, tmp_path, extra, match):
    r = CliRunner().invoke(cli, ["refactor", str(tiny / "dense"), str(tmp_path / "o")] + extra)
    assert r.exit_code == 2, r.output
    assert match in r.output and "Traceback" not in r.output
