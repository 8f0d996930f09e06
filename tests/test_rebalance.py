"""Expert slots follow traffic across the models of one budget (`fleet.Rebalancer`): shrinks before
grows so the shares never pass the budget, an idle model keeps its experts for `idle_s`, and the
running engines really move their slots without changing an answer."""

from __future__ import annotations

import json
import time

from edge_readme import Engine
from edge_readme.routing import fleet
from tests.tiny_models import write_moe

A = fleet.ModelNeeds("a", 100, 10, 8)
B = fleet.ModelNeeds("b", 200, 10, 8)
BUDGET = 400


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(live, calls, fail=()):
    shares = fleet.split(BUDGET, [A, B])
    clock = Clock()

    def apply(name, nbytes):
        if name in fail:
            raise RuntimeError(f"{name} cannot move")
        calls.append((name, nbytes))
        total = sum(nbytes if n == name else s for n, s in r.shares.items())
        assert total <= BUDGET  # at every step, not only at the end

    r = fleet.Rebalancer(BUDGET, [A, B], shares, lambda: live, apply, idle_s=5.0, clock=clock)
    return r, clock


def test_busy_model_takes_the_idle_ones_slots_shrink_first():
    live, calls = {"a": 0, "b": 3}, []
    r, clock = make(live, calls)
    assert fleet.slots(r.shares, [A, B]) == {"a": 6, "b": 6}
    assert r.tick()
    assert [n for n, _ in calls] == ["a", "b"]  # a shrinks before b grows
    assert fleet.slots(r.shares, [A, B]) == {"a": 1, "b": 8}
    assert not r.tick()  # nothing changed: nothing applied
    assert len(calls) == 2 and r.moves == 1


def test_an_idle_model_keeps_its_slots_for_idle_s():
    live, calls = {"a": 1, "b": 1}, []
    r, clock = make(live, calls)
    r.tick()
    even = dict(r.shares)
    live["a"] = 0  # a finished its request; b still runs
    clock.t = 4.0
    r.tick()
    assert r.shares == even  # a counts as busy for 5 s after its last request
    clock.t = 5.5
    assert r.tick()
    assert fleet.slots(r.shares, [A, B])["a"] == 1
    live["b"] = 0
    clock.t = 20.0  # nobody busy: back to the default split
    r.tick()
    assert fleet.slots(r.shares, [A, B]) == {"a": 6, "b": 6}


def test_a_failed_shrink_stops_the_grows():
    live, calls = {"a": 0, "b": 3}, []
    r, clock = make(live, calls, fail=("a",))
    before = dict(r.shares)
    assert not r.tick()
    assert calls == [] and r.shares == before
    assert "a cannot move" in str(r.last_error)


def two_models(tmp_path):
    out = []
    for name, seed in (("chat", 0), ("coder", 7)):
        folder = tmp_path / name
        write_moe(folder, num_experts=4, layers=2, seed=seed)
        cfg = json.loads((folder / "config.json").read_text())
        cfg["moe"]["domains"] = ["code", "conversation", "docs", "legal"]
        (folder / "config.json").write_text(json.dumps(cfg))
        out.append(str(folder))
    return out


def test_running_engines_move_their_slots_and_answers_stay(tmp_path):
    from edge_readme.server.routed import Fleet

    chat, coder = two_models(tmp_path)
    opts = dict(device="cpu", context_length=128)
    needs = fleet.measure([chat, coder], opts)
    budget = sum(n.minimum_bytes for n in needs) + 4 * max(n.slot_bytes for n in needs)
    shares = fleet.split(budget, needs)
    alone = {}
    for m in (chat, coder):
        with Engine.load(m, **opts) as e:
            alone[m] = e.generate("the cat sat", max_tokens=12, temperature=0.0).token_ids
    engines = {m: Engine.load(m, memory_budget=shares[m], **opts) for m in (chat, coder)}
    f = Fleet.of(engines, None)
    f.budget, f.needs, f.shares, f.rebalance_every = budget, needs, dict(shares), 0.05
    try:
        f.holders[coder].inflight = 2
        f.start_rebalancing()
        deadline = time.monotonic() + 30
        while f.rebalancer.moves == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        f.rebalancer.stop()
        assert f.rebalancer.last_error is None
        want = fleet.slots(fleet.by_queue(budget, needs, {coder: 2}), needs)
        assert {m: e.runtime.plan.slots for m, e in engines.items()} == want
        assert want[chat] == 1 and want[coder] > fleet.slots(shares, needs)[coder]
        resident = sum(e.runtime.resident_bytes() for e in engines.values())
        assert resident <= budget
        for m, e in engines.items():
            assert e.generate("the cat sat", max_tokens=12, temperature=0.0).token_ids == alone[m]
        mem = f.memory()
        assert mem["rebalance"]["moves"] >= 1 and mem["expert_slots"] == want
    finally:
        f.close()


def test_a_fixed_split_starts_no_rebalancer(tmp_path):
    from edge_readme.server.routed import Fleet

    f = Fleet(["x"], budget=None)
    f.start_rebalancing()
    assert f.rebalancer is None
    f.close()


def test_split_knows_every_expert_fits_packed_in_less():
    c = fleet.ModelNeeds("c", 100, 10, 8, all_resident_bytes=145)  # 8 experts packed in 45
    assert c.room() == 5
    shares = fleet.split(10_000, [c, B])
    assert shares["c"] == 145  # not 100 + 7 x 10: the rest stays with the pool
    assert fleet.slots(shares, [c, B])["c"] == 8
    assert fleet.slots({"c": 144, "b": 200}, [c, B])["c"] == 5  # short of packed: uniform
