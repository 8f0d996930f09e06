"""Continuous batching: batched requests give the tokens they give alone, the scheduler keeps its
fairness bound and expert cap on hand-built paths, and a full queue is refused, not grown."""

from __future__ import annotations

import threading

import pytest
import torch

from edge_readme import Engine, QueueFullError
from edge_readme.scheduler import POLICIES, Scheduler, Seq
from tests.tiny_dense import write_tiny_dense
from tests.tiny_models import write_moe

PROMPTS = ["the theory of heat", " a tiny test, then another one", "on and on", "x",
           "then the other one in the heat of it all, on and on and on"]


@pytest.fixture(scope="module", params=["moe", "dense"])
def model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    if request.param == "moe":
        return write_moe(d / "tiny-moe", num_experts=4, layers=3)
    return write_tiny_dense(d)


@pytest.fixture(scope="module")
def solo(model):
    with Engine.load(str(model), device="cpu", context_length=128) as e:
        return {p: e.generate(p, max_tokens=12).token_ids for p in PROMPTS}


def run_together(e: Engine, prompts=PROMPTS, **kw) -> dict[str, list[int]]:
    streams = {p: e.stream(p, max_tokens=12, **kw) for p in prompts}
    return {p: s.collect().token_ids for p, s in streams.items()}


@pytest.mark.parametrize("schedule", POLICIES)
def test_exact_mode_gives_each_request_its_solo_tokens(model, solo, schedule):
    with Engine.load(str(model), device="cpu", context_length=128, max_batch=3,
                     schedule=schedule, exact=True) as e:
        assert run_together(e) == solo
        assert max(n for n, _, _ in e.step_log) > 1  # several sequences in flight at once


@pytest.mark.parametrize("schedule", POLICIES)
def test_batched_forward_gives_each_request_its_solo_tokens(model, solo, schedule):
    with Engine.load(str(model), device="cpu", context_length=128, max_batch=3,
                     schedule=schedule, prefill_chunk=8) as e:
        got = run_together(e)
        multi = [t for n, t, _ in e.step_log if n > 1]
    assert multi and max(multi) > 2  # one forward pass carried several sequences' tokens
    assert got == solo


def test_expert_aware_touches_fewer_experts_per_step_than_fcfs(tmp_path):
    folder = write_moe(tmp_path / "moe8", num_experts=8, layers=3)
    mean = {}
    for schedule in ("fcfs", "expert-aware"):
        with Engine.load(str(folder), device="cpu", context_length=128, max_batch=5,
                         schedule=schedule, expert_cap=2, fairness=3,
                         cap_loads_only=False) as e:
            run_together(e, [p + " " + str(i) for i in range(2) for p in PROMPTS])
            decode = [d for n, t, d in e.step_log if n == t and n > 1]  # batched decode steps
            mean[schedule] = sum(decode) / len(decode)
            assert not e._sched.busy()
    assert mean["expert-aware"] < mean["fcfs"]


def test_a_cancel_mid_batch_leaves_the_others_exact(model, solo):
    for exact in (False, True):
        with Engine.load(str(model), device="cpu", context_length=128, max_batch=3,
                         exact=exact) as e:
            doomed = e.stream("go on and on", max_tokens=100, ignore_eos=True)
            streams = {p: e.stream(p, max_tokens=12) for p in PROMPTS[:3]}
            for n, _ in enumerate(doomed):
                if n == 3:
                    doomed.cancel()
            assert doomed.result.finish_reason == "cancelled"
            assert {p: s.collect().token_ids for p, s in streams.items()} == {
                p: solo[p] for p in PROMPTS[:3]}


# ---------------------------------------------------------------- the scheduler on its own


def decode_seq(expert: int, layers: int = 2) -> Seq:
    s = Seq([1], path=torch.full((1, layers), expert))
    s.fed, s.next_token, s.next_path = 1, 7, torch.full((1, layers), expert)
    return s


def test_expert_aware_groups_by_expert_and_alternates_groups():
    sched = Scheduler("expert-aware", max_batch=3, token_budget=16, fairness=2, expert_cap=1)
    a, b, c = decode_seq(0), decode_seq(1), decode_seq(0)
    for s in (a, b, c):
        sched.add(s)
    assert sched.admit() == [a, b, c]
    picks = [[i.seq for i in sched.next_batch()] for _ in range(4)]
    # A and C share expert 0 and run together; B (expert 1) has waited longest next time
    assert picks == [[a, c], [b], [a, c], [b]]
    assert max(s.max_waited for s in (a, b, c)) == 1


def test_the_fairness_bound_forces_a_sequence_in_past_the_cap():
    sched = Scheduler("expert-aware", max_batch=3, token_budget=16, fairness=1, expert_cap=1)
    a, b = decode_seq(0), decode_seq(1)
    for s in (a, b):
        sched.add(s)
    sched.admit()
    b.waited = 1  # left out once already: the bound forces it in; A (past the cap) waits
    assert [i.seq for i in sched.next_batch()] == [b]
    assert [i.seq for i in sched.next_batch()] == [a]


def test_with_a_cache_the_cap_counts_only_experts_to_load():
    resident = {(0, 1), (1, 1)}
    sched = Scheduler("expert-aware", max_batch=3, token_budget=16, fairness=5, expert_cap=1,
                      resident=resident.__contains__)
    a, b, c = decode_seq(0), decode_seq(1), decode_seq(2)
    for s in (a, b, c):
        sched.add(s)
    sched.admit()
    # B's expert is resident: it costs no load and joins; A and C each need a load, one fits
    assert [i.seq for i in sched.next_batch()] == [b, a]
    assert [i.seq for i in sched.next_batch()] == [b, c]


@pytest.mark.parametrize("fairness", [0, 1, 3])
def test_no_running_sequence_waits_more_than_the_fairness_bound(fairness):
    g = torch.Generator().manual_seed(0)
    sched = Scheduler("expert-aware", max_batch=6, token_budget=64, fairness=fairness,
                      expert_cap=1)
    seqs = []
    for i in range(6):
        s = Seq(list(range(1, 10 + i)), path=torch.randint(0, 8, (9 + i, 4), generator=g))
        seqs.append(s)
        sched.add(s)
    sched.admit()
    for _ in range(60):
        items = sched.next_batch()
        assert items
        unforced = [i for i in items if i.seq.waited == 0]
        for i in items:
            s = i.seq
            if s.prefilling:
                s.fed += len(i.tokens)
            s.next_token = 5
            s.next_path = torch.randint(0, 8, (1, 4), generator=g)
        assert unforced
    assert max(s.max_waited for s in seqs) <= fairness


def test_unknown_schedule_is_refused(tmp_path):
    with pytest.raises(Exception, match="--schedule: unknown 'lifo'"):
        Scheduler("lifo", 1, 8)


# ---------------------------------------------------------------- the queue limit


def test_full_queue_is_refused_and_a_cancel_frees_the_slot(tmp_path):
    folder = write_tiny_dense(tmp_path)
    with Engine.load(str(folder), device="cpu", context_length=128, max_batch=1,
                     max_queue=1) as e:
        first = e.stream("go on", max_tokens=100, ignore_eos=True)
        second = e.stream("queued", max_tokens=3, ignore_eos=True)
        with pytest.raises(QueueFullError, match="--max-queue 1") as info:
            e.stream("one too many", max_tokens=3)
        assert info.value.retry_after >= 1
        first.cancel()
        assert first.collect().finish_reason == "cancelled"
        assert second.collect().finish_reason == "length"
        done = threading.Event()
        threading.Thread(target=lambda: (e.generate("again", max_tokens=2), done.set())).start()
        assert done.wait(30)
