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


def test_refactor_with_delta_rank_and_a_bad_combination(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_README_HOME", str(tmp_path / "home"))
    base = ["refactor", str(tiny / "dense"), str(tmp_path / "moe"), "--data",
            str(tiny / "data.jsonl"), "--seq-len", "32", "--sequences-per-domain", "3",
            "--router-steps", "3"]
    r = CliRunner().invoke(cli, base + ["--delta-rank", "2"])
    assert r.exit_code != 0 and "finetune_steps is 0" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, base + ["--finetune-steps", "3", "--delta-rank", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.index("{"):])["delta"]["rank"] == 2
    assert (tmp_path / "moe" / "deltas.safetensors").exists()


def test_eval_chat_set_side_by_side(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_README_HOME", str(tmp_path / "home"))
    out = tmp_path / "moe"
    r = CliRunner().invoke(cli, ["refactor", str(tiny / "dense"), str(out), "--data",
                                 str(tiny / "data.jsonl"), "--seq-len", "32",
                                 "--sequences-per-domain", "3", "--router-steps", "3"])
    assert r.exit_code == 0, r.output
    qs = tmp_path / "qs.jsonl"
    qs.write_text("\n".join(json.dumps({"id": f"q{i}", "category": c, "prompt": "the moon",
                                        "answer": a, "source": "test"})
                            for i, (c, a) in enumerate([("any", "."), ("never", "^(?!)")])))
    args = ["eval", str(out), "--chat-set", str(qs), "--reference", str(tiny / "dense"),
            "--max-tokens", "3"]
    r = CliRunner().invoke(cli, args + ["--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output[r.output.index("{"):])
    for role in ("moe", "dense"):
        assert rep[role]["total"] == 2 and rep[role]["by_category"]["never"] == "0/1"
    assert [i["id"] for i in rep["items"]] == ["q0", "q1"]
    r = CliRunner().invoke(cli, args + ["--no-repeat-ngram", "1"])
    assert r.exit_code == 0 and "as many as" in r.output, r.output
    qs.write_text('{"id": "x", "category": "c", "prompt": "p", "answer": "(", "source": "s"}\n')
    r = CliRunner().invoke(cli, ["eval", str(out), "--chat-set", str(qs)])
    assert r.exit_code != 0 and "qs.jsonl:1" in r.output and "answer" in r.output
    assert "Traceback" not in r.output
