"""`edge-readme bench` on the tiny MoE: report fields, the optimum bound, the trace, bad input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edge_readme import bench
from edge_readme.cache.policies import simulate
from edge_readme.cli.main import cli
from edge_readme.errors import BudgetError, DataError
from tests.tiny_models import write_moe

PROMPTS = [bench.Prompt("the theory of heat", 6), bench.Prompt(" a tiny test, then on", 6)]


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return write_moe(tmp_path_factory.mktemp("bench") / "moe")


@pytest.fixture(scope="module")
def report(moe, tmp_path_factory):
    trace = tmp_path_factory.mktemp("trace") / "trace.jsonl"
    r = bench.sweep(str(moe), PROMPTS, bench.parse_budgets("25%,50%"),
                    policies=["lru", "belady"], modes=["none", "path+spec"],
                    engine_kwargs={"device": "cpu", "context_length": 128}, trace_path=trace)
    return r, trace


def test_report_fields(report):
    r, _ = report
    assert len(r["cells"]) == 2 * 2 * 2
    assert r["plan"]["expert_keys"] == 12 and r["workload"]["prompts"] == 2
    for c in r["cells"]:
        for key in ("budget", "slots", "policy", "lookahead", "hit_ratio", "load_hit_ratio",
                    "optimum_hit_ratio", "bytes_read", "prefill_tokens_per_s",
                    "decode_tokens_per_s", "stall_share", "speculation"):
            assert key in c, key
        assert c["accesses"] == c["hits"] + c["misses"] > 0
        assert c["budget_bytes"] == r["plan"]["fixed_bytes"] + c["slots"] * r["plan"]["slot_bytes"]
    assert {c["slots"] for c in r["cells"]} == {3, 6}
    spec = [c for c in r["cells"] if c["lookahead"] == "path+spec"]
    assert all(c["speculation"]["guesses"] > 0 for c in spec)
    assert json.loads(json.dumps(r)) == r
    assert "optimum" in bench.format_table(r)


def test_optimum_bounds_every_policy(report):
    r, _ = report
    for c in r["cells"]:
        # no schedule, prefetching or not, loads fewer experts than Belady's MIN
        assert c["optimum_hit_ratio"] >= c["load_hit_ratio"] - 1e-9, c
        if c["lookahead"] == "none":
            assert c["optimum_hit_ratio"] >= c["hit_ratio"] - 1e-9, c


def test_trace_file_format(report):
    r, path = report
    lines = path.read_text().splitlines()
    first = r["cells"][0]
    assert len(lines) == first["accesses"]
    recs = [json.loads(line) for line in lines]
    assert all(set(x) == {"step", "layer", "expert"} for x in recs)
    steps = [x["step"] for x in recs]
    assert steps[0] == 0 and steps == sorted(steps)
    assert all(0 <= x["layer"] < 3 and 0 <= x["expert"] < 4 for x in recs)
    # decode steps touch each layer once, in layer order
    last = [x["layer"] for x in recs if x["step"] == steps[-1]]
    assert last == [0, 1, 2]


def test_trace_replays_lru_hits(report):
    r, path = report
    first = r["cells"][0]
    assert (first["policy"], first["lookahead"]) == ("lru", "none")
    keys = [(layer, expert) for _, layer, expert in bench.read_trace(path)]
    sim = simulate(keys, first["slots"], "lru")
    assert (sim.hits, sim.misses) == (first["hits"], first["misses"])
    assert first["optimum_hit_ratio"] == pytest.approx(
        simulate(keys, first["slots"], "belady").hit_ratio, abs=1e-4)


def test_cli_writes_json_and_trace(moe, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "on and on", "max_tokens": 3}\n\n{"prompt": "the heat"}\n')
    out, trace = tmp_path / "out", tmp_path / "t.jsonl"
    res = CliRunner().invoke(cli, ["bench", "-m", str(moe), "--prompts", str(prompts),
                                   "--budgets", "50%,100%", "--policies", "lru",
                                   "--lookahead", "path", "--max-tokens", "2", "--out", str(out),
                                   "--trace", str(trace), "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "bench.json").read_text())
    assert [c["slots"] for c in data["cells"]] == [6, 12]
    assert data["cells"][1]["hit_ratio"] == 1.0 and data["cells"][1]["optimum_hit_ratio"] == 1.0
    assert trace.read_text().count("\n") == data["cells"][0]["accesses"]


@pytest.mark.parametrize("line, match", [
    ("not json", "line 2: not valid JSON"),
    ('["a list"]', "line 2: found a JSON list"),
    ('{"text": "x"}', "line 2: field 'prompt'"),
    ('{"prompt": ""}', "line 2: field 'prompt'"),
    ('{"prompt": "x", "max_tokens": 0}', "line 2: field 'max_tokens'"),
    ('{"prompt": "x", "max_tokens": "3"}', "line 2: field 'max_tokens'"),
])
def test_bad_prompt_files(tmp_path, line, match):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=match) as err:
        bench.load_prompts(path)
    assert str(path) in str(err.value)


def test_empty_or_missing_prompt_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no prompts"):
        bench.load_prompts(tmp_path / "e.jsonl")
    with pytest.raises(DataError, match="cannot read"):
        bench.load_prompts(tmp_path / "missing.jsonl")


def test_cli_bad_prompt_file_is_one_line(moe, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("{oops\n")
    res = CliRunner().invoke(cli, ["bench", "-m", str(moe), "--prompts", str(path)])
    assert res.exit_code == 2
    assert f"{path}, line 1: not valid JSON" in res.output
    assert "Traceback" not in res.output


def test_parse_budgets():
    specs = bench.parse_budgets("25%, 50%,100%,2MiB")
    assert [s.share for s in specs[:3]] == [0.25, 0.5, 1.0]
    assert specs[3].expert_bytes == 2 * 2**20
    assert specs[0].slots(1000, 12) == 3 and specs[3].slots(2**20, 12) == 2
    with pytest.raises(BudgetError, match="holds no expert slot"):
        bench.parse_budgets("1%")[0].slots(1000, 12)


@pytest.mark.parametrize("text, match", [
    ("0%", r"\(0%, 100%\]"), ("150%", r"\(0%, 100%\]"), ("25%,,50%", "empty item"),
    ("12parsecs", "cannot parse"), ("auto", "not a sweep point"), ("-5%", "cannot parse"),
])
def test_parse_budgets_errors(text, match):
    with pytest.raises(BudgetError, match=match):
        bench.parse_budgets(text)


def test_cli_bad_flags(moe):
    runner = CliRunner()
    res = runner.invoke(cli, ["bench", "-m", str(moe), "--budgets", "50%,lots"])
    assert res.exit_code == 2 and "--budgets 'lots'" in res.output
    res = runner.invoke(cli, ["bench", "-m", str(moe), "--policies", "lru,mru"])
    assert res.exit_code == 2 and "'mru'" in res.output
    res = runner.invoke(cli, ["bench", "-m", str(moe), "--lookahead", "far"])
    assert res.exit_code == 2 and "'far'" in res.output
