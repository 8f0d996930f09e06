"""The Expert Router server on two tiny random Read-ME models: routing by `model: "auto"`, the
chosen model in the body and a header, 404s, exact tokens against each model alone, streaming,
one memory budget split across the models, and the CLI's plan and route-file errors."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from click.testing import CliRunner  # noqa: E402

from edge_readme import Engine  # noqa: E402
from edge_readme.cli.main import cli  # noqa: E402
from edge_readme.errors import BudgetTooSmallError  # noqa: E402
from edge_readme.routing import build, fleet, spec_from  # noqa: E402
from edge_readme.runtime import dry_run_plan  # noqa: E402
from edge_readme.server.protocol import Limits  # noqa: E402
from edge_readme.server.routed import Fleet, create_routed_app  # noqa: E402
from tests.serving_util import background  # noqa: E402
from tests.tiny_models import write_moe  # noqa: E402

CODE = "def add(a, b):\n    return a + b  # write a unit test for this python function"
CHAT = "Tell me a short story about a fox who learns to swim."
OPTS = dict(device="cpu", context_length=256, max_batch=2)


def tiny_moe(folder, seed):
    write_moe(folder, num_experts=3, layers=2, seed=seed)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["moe"]["domains"] = ["code", "conversation", "docs"]
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("routed")
    return tiny_moe(root / "tiny-chat", 0), tiny_moe(root / "tiny-coder", 7)


@pytest.fixture(scope="module")
def served(models):
    chat, coder = models
    spec = spec_from([chat, coder], "linear")
    engines = {m: Engine.load(m, **OPTS) for m in (chat, coder)}
    f = Fleet.of(engines, build(spec))
    app = create_routed_app(f, limits=Limits(max_tokens=64))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    with background(server) as port:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            yield http, chat, coder
    f.close()


def test_default_table_sends_code_to_the_coder(models):
    chat, coder = models
    assert spec_from([chat, coder]).table == {"code": coder, "chat": chat, "docs": chat}


def test_models_lists_auto_and_every_model(served):
    http, chat, coder = served
    ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert ids == ["auto", chat, coder]
    h = http.get("/health").json()
    assert h["status"] == "ok" and set(h["models"]) == {chat, coder} and h["router"] == "linear"


@pytest.mark.parametrize("prompt, want", [(CODE, 1), (CHAT, 0)])
def test_auto_routes_per_prompt_and_says_where(served, prompt, want):
    http, *names = served
    r = http.post("/v1/chat/completions", json={
        "model": "auto", "messages": [{"role": "user", "content": prompt}], "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == names[want] == r.headers["x-edge-readme-model"]
    assert r.headers["x-edge-readme-route"] == f"linear:{['chat', 'code'][want]}"
    assert float(r.headers["x-edge-readme-route-ms"]) >= 0
    assert r.json()["stats"]["route"]["label"] == ["chat", "code"][want]


def test_a_named_model_goes_to_it_and_an_unknown_one_is_404(served):
    http, chat, coder = served
    r = http.post("/v1/completions", json={"model": chat, "prompt": CODE, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == chat
    assert r.headers["x-edge-readme-model"] == chat and "x-edge-readme-route" not in r.headers
    r = http.post("/v1/completions", json={"model": "gpt-4", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model" and "auto" in err["message"]
    r = http.post("/v1/completions", json={"model": 3, "prompt": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


@pytest.mark.parametrize("prompt", [CODE, CHAT, "The timeout option sets the seconds"])
def test_routed_tokens_equal_the_model_alone(served, prompt):
    """Temperature 0: the routed request gives exactly the tokens of its model's own engine."""
    http, *_ = served
    body = {"model": "auto", "prompt": prompt, "max_tokens": 12, "temperature": 0,
            "ignore_eos": True}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    name = r.headers["x-edge-readme-model"]
    with Engine.load(name, **OPTS) as alone:
        want = alone.generate(prompt, max_tokens=12, temperature=0, ignore_eos=True)
    got = r.json()
    assert got["choices"][0]["text"] == want.text
    assert got["usage"]["completion_tokens"] == len(want.token_ids) == 12
    # streamed: the same text, the same model in every chunk and in the header
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
        assert s.headers["x-edge-readme-model"] == name
        chunks = [json.loads(line[6:]) for line in s.iter_lines()
                  if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == want.text
    assert {c["model"] for c in chunks} == {name}


def test_token_id_prompts_go_to_the_chat_model(served):
    http, chat, _ = served
    r = http.post("/v1/completions", json={"model": "auto", "prompt": [5, 6, 7],
                                           "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == chat


# ------------------------------------------------------------------ one budget


def needs(models):
    return fleet.measure(list(models), OPTS)


def test_budget_below_the_dense_parts_is_refused_with_the_minimum(models):
    n = needs(models)
    minimum = sum(x.minimum_bytes for x in n)
    with pytest.raises(BudgetTooSmallError, match="below the minimum") as e:
        fleet.split(minimum - 1, n)
    assert e.value.minimum_bytes == minimum
    shares = fleet.split(minimum, n)
    assert fleet.slots(shares, n) == {x.name: 1 for x in n}


def test_split_matches_each_models_own_plan(models):
    """Each share, given to the model's own plan, buys exactly the slots the split counted."""
    n = needs(models)
    budget = sum(x.minimum_bytes for x in n) + 3 * max(x.slot_bytes for x in n)
    shares = fleet.split(budget, n)
    assert sum(shares.values()) <= budget
    for x in n:
        plan = dry_run_plan(x.name, {**OPTS, "memory_budget": shares[x.name]})
        assert plan["slots"] == fleet.slots(shares, n)[x.name]
        assert plan["budget_bytes"] == shares[x.name]


def test_idle_model_gives_its_slots_to_the_busy_one():
    a = fleet.ModelNeeds("a", 100, 10, 8)
    b = fleet.ModelNeeds("b", 200, 10, 8)
    even = fleet.slots(fleet.split(400, [a, b]), [a, b])
    assert even == {"a": 6, "b": 6}  # one slot each + 100 free bytes = 10 slots, halved
    busy = fleet.slots(fleet.by_queue(400, [a, b], {"a": 0, "b": 3}), [a, b])
    assert busy == {"a": 1, "b": 8}  # b holds all it can use; a keeps its one slot
    assert fleet.slots(fleet.by_queue(400, [a, b], {}), [a, b]) == even  # no traffic: default
    big = fleet.slots(fleet.split(10_000, [a, b]), [a, b])
    assert big == {"a": 8, "b": 8}  # never more slots than experts


def test_health_reports_the_split_and_the_split_traffic_would_set(models):
    chat, coder = models
    n = needs(models)
    budget = sum(x.minimum_bytes for x in n) + 4 * max(x.slot_bytes for x in n)
    f = Fleet([chat, coder], budget=budget, needs=n, shares=fleet.split(budget, n))
    f.holders[coder].inflight = 2
    mem = f.memory()
    assert mem["by_queue"]["expert_slots"][chat] == 1
    assert mem["by_queue"]["expert_slots"][coder] >= mem["expert_slots"][coder]


# ------------------------------------------------------------------ the CLI


def test_cli_dry_run_json_shows_the_split(models):
    chat, coder = models
    n = needs(models)
    budget = sum(x.minimum_bytes for x in n) + 2 * max(x.slot_bytes for x in n)
    r = CliRunner().invoke(cli, ["serve", "--route", "auto", "-m", chat, "-m", coder,
                                 "--device", "cpu", "--context-length", "256", "--max-batch",
                                 "2", "--memory-budget", str(budget), "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["budget_bytes"] == budget and out["planned_bytes"] <= budget
    assert set(out["models"]) == {chat, coder}
    assert out["route"]["table"]["code"] == coder
    r = CliRunner().invoke(cli, ["serve", "--route", "auto", "-m", chat, "-m", coder,
                                 "--device", "cpu", "--context-length", "256", "--max-batch",
                                 "2", "--memory-budget", str(budget // 4), "--dry-run"])
    assert r.exit_code == 2 and "below the minimum" in r.output
    assert "Traceback" not in r.output


def test_cli_route_file_errors_name_the_field(tmp_path, models):
    p = tmp_path / "route.toml"
    p.write_text(f'models = ["{models[0]}"]\nroute = "kmeans"\n[table]\ncode = "nope"\n')
    r = CliRunner().invoke(cli, ["serve", "--route-file", str(p), "--dry-run"])
    assert r.exit_code == 2 and "table.code: expected one of the models" in r.output
    assert str(p) in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["serve", "--route-file", str(p), "-m", models[0], "--dry-run"])
    assert r.exit_code == 2 and "without -m" in r.output




def test_check_room_refuses_before_tokenizing(models):
    from edge_readme.errors import QueueFullError

    with Engine.load(models[0], device="cpu", context_length=256, max_batch=1,
                     max_queue=0) as e:
        e.check_room()  # empty: room
        s = e.stream("hello there", max_tokens=200, ignore_eos=True)
        next(iter(s))  # running: the one slot is taken, and no queue
        with pytest.raises(QueueFullError, match="--max-queue 0"):
            e.check_room()
        s.cancel()
        s.collect()


def test_cli_single_model_dry_run_is_its_own_plan(models):
    r = CliRunner().invoke(cli, ["serve", "-m", models[0], "--device", "cpu",
                                 "--context-length", "256", "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["route"] is None and list(out["models"]) == [models[0]]
    want = dry_run_plan(models[0], {"device": "cpu", "context_length": 256, "max_batch": 4})
    assert out["models"][models[0]]["slots"] == want["slots"]


def test_readme_kind_reads_the_loaded_engines_router(models):
    from edge_readme.cli.route import make_router

    chat, coder = models
    with Engine.load(chat, **OPTS) as e:
        f = Fleet([chat, coder])
        f.holders[chat].engine = e
        pr = make_router(spec_from([chat, coder], "readme", readme_model=chat), f)
        assert pr.kind == "readme" and pr.classifier.router is e.runtime.router  # no copy
        d = pr.choose(CODE)
        assert d.model in (chat, coder) and d.label in ("code", "chat", "docs")
        dist = pr.classifier.domain_distribution(CODE)
        assert abs(float(dist.sum()) - 1) < 1e-5 and len(dist) == 3
