"""Expert slots move while serving: `ExpertCache.resize`, `Runtime/Engine.set_memory_budget`.

A shrink evicts by the policy, compacts the survivors below the line, and returns the freed pages
to the OS; a grow takes reserved address space. Answers never change (offloading is exact)."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from edge_readme import Engine
from edge_readme.cache import ExpertCache, ExpertStore
from edge_readme.cache.policies import POLICIES
from edge_readme.errors import BudgetError, BudgetTooSmallError, EdgeReadmeError
from edge_readme.experts_format import read_manifest
from edge_readme.runtime import dry_run_plan
from tests.moe_fixture import write_fixture
from tests.test_expert_cache import _check, _in_block
from tests.tiny_dense import write_tiny_dense
from tests.tiny_models import write_moe


def rss_anon() -> int:
    with open("/proc/self/status") as fh:
        line = next(ln for ln in fh if ln.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_resize_keeps_every_expert_exact(tmp_path, policy):
    _, experts = write_fixture(tmp_path, torch.bfloat16, layers=4, experts=5)
    manifest = read_manifest(tmp_path)
    store = ExpertStore(manifest)
    rng = random.Random(1)
    trace = [rng.choice(manifest.keys()) for _ in range(200)]
    cache = ExpertCache(store, manifest, 6, "cpu", torch.float32, policy)
    cache.lookahead.extend(trace)
    sizes = iter([2, 20, 1, 9, 20, 3] * 10)
    for i, key in enumerate(trace):
        if i % 17 == 16:
            n = cache.resize(next(sizes))
            assert n == cache.num_slots and cache.block.shape[0] == n
            assert len(cache.resident()) <= n
        with cache.get(*key) as w:
            _check(w, experts[key], torch.float32)
            assert _in_block(cache, w.gate_up) and _in_block(cache, w.down)
        cache.lookahead.advance(key)
    assert cache.resize(10 ** 6) == len(manifest.entries)  # capped at one slot per expert
    assert cache.resize(0) == 1
    store.close()


def test_shrink_evicts_the_expert_needed_last(tmp_path):
    write_fixture(tmp_path, torch.bfloat16, layers=1, experts=4)
    manifest = read_manifest(tmp_path)
    store = ExpertStore(manifest)
    cache = ExpertCache(store, manifest, 4, "cpu", torch.float32, "belady")
    keys = manifest.keys()
    for k in keys:
        with cache.get(*k):
            pass
    cache.lookahead.extend([keys[2], keys[0], keys[3]])  # keys[1] is never used again
    cache.resize(3)
    assert keys[1] not in cache.resident()
    cache.resize(1)
    assert cache.resident() == [keys[2]]  # the one needed first stays
    store.close()


def test_shrink_returns_memory_to_the_os(tmp_path):
    write_fixture(tmp_path, torch.float32, layers=2, experts=8, hidden=512, rows=(1024, 1024))
    manifest = read_manifest(tmp_path)  # 16 experts x 6 MiB
    store = ExpertStore(manifest)
    cache = ExpertCache(store, manifest, 16, "cpu", torch.float32, "lru")
    for k in manifest.keys():
        with cache.get(*k):
            pass
    full = rss_anon()
    cache.resize(2)
    freed = 14 * cache.slot_bytes
    assert full - rss_anon() >= 0.8 * freed
    cache.resize(16)  # grows again without a new allocation
    for k in manifest.keys():
        with cache.get(*k):
            pass
    assert rss_anon() - full < 0.2 * freed + (8 << 20)
    store.close()


def test_resize_refuses_while_an_expert_is_in_use(tmp_path):
    write_fixture(tmp_path, torch.bfloat16)
    manifest = read_manifest(tmp_path)
    store = ExpertStore(manifest)
    cache = ExpertCache(store, manifest, 3, "cpu", torch.float32, "lru")
    with cache.get(*manifest.keys()[0]):
        with pytest.raises(BudgetError, match="between forward passes"):
            cache.resize(1)
    store.close()


def greedy(engine, prompt="the cat sat on the mat", n=16) -> list[int]:
    engine.reset()  # prefill afresh: a reused prefix re-runs its last token alone, and the q4
    # kernel rounds a one-row matmul differently from a six-row one (not this file's subject)
    return list(engine.generate(prompt, max_tokens=n, temperature=0.0).token_ids)


def test_engine_budget_moves_and_answers_stay(tmp_path):
    folder = write_moe(tmp_path / "moe", num_experts=4)
    plan = dry_run_plan(str(folder), {"context_length": 128})
    minimum, full = plan["minimum_bytes"], plan["all_resident_bytes"]
    with Engine.load(str(folder), device="cpu", context_length=128) as e:
        ref = greedy(e)
        keys = len(e.runtime.manifest.entries)
        assert e.runtime.plan.slots == keys
        for budget in (minimum, (minimum + full) // 2, full, minimum + 1):
            got = e.set_memory_budget(budget)
            assert got["budget_bytes"] == budget and 1 <= got["slots"] <= keys
            assert e.runtime.cache.num_slots == got["slots"]
            assert greedy(e) == ref
            mem = e.stats()["memory"]
            assert mem["resident_bytes"] <= budget
        with pytest.raises(BudgetTooSmallError, match="minimum"):
            e.set_memory_budget(minimum - 1)
        with pytest.raises(EdgeReadmeError, match="auto"):
            e.set_memory_budget("auto")
        assert greedy(e) == ref  # a refused change leaves the engine as it was


def test_budget_changes_between_steps_of_a_running_request(tmp_path):
    folder = write_moe(tmp_path / "moe", num_experts=4)
    plan = dry_run_plan(str(folder), {"context_length": 128})
    with Engine.load(str(folder), device="cpu", context_length=128) as e:
        ref = greedy(e, n=40)
        stream = e.stream("the cat sat on the mat", max_tokens=40, temperature=0.0)
        done = threading.Event()

        def churn():
            budgets = [plan["minimum_bytes"], plan["all_resident_bytes"]]
            i = 0
            while not done.is_set():
                e.set_memory_budget(budgets[i % 2])
                i += 1

        t = threading.Thread(target=churn)
        t.start()
        try:
            ids = stream.collect().token_ids
        finally:
            done.set()
            t.join()
        assert list(ids) == ref


def test_dense_model_has_no_slots_to_move(tmp_path):
    with Engine.load(str(write_tiny_dense(tmp_path / "d")), device="cpu",
                     context_length=64) as e:
        with pytest.raises(EdgeReadmeError, match="dense model"):
            e.set_memory_budget(1 << 30)


@pytest.mark.parametrize("file_dtype", [torch.bfloat16, torch.float32])
def test_packed_cache_holds_each_expert_in_its_own_size(tmp_path, file_dtype):
    from edge_readme.cache.expert_cache import packed_nbytes, slot_nbytes

    _, experts = write_fixture(tmp_path, file_dtype, layers=3, experts=4, rows=(8, 40))
    manifest = read_manifest(tmp_path)
    store = ExpertStore(manifest)
    keys = manifest.keys()
    cache = ExpertCache(store, manifest, len(keys), "cpu", torch.float32, "belady", packed=True)
    total = packed_nbytes(manifest, "float", torch.float32, torch.float32)
    assert cache.block.nbytes == total < len(keys) * slot_nbytes(manifest, "float",
                                                                  torch.float32, torch.float32)
    order = keys[::-1] + keys
    for key in order:
        with cache.get(*key) as w:
            _check(w, experts[key], torch.float32)
            assert _in_block(cache, w.gate_up) and _in_block(cache, w.down)
    assert cache.stats.evictions == 0 and sorted(cache.resident()) == sorted(keys)
    assert cache.resize(2) == 2 and cache._packed is None  # back to uniform slots, empty
    for key in order:
        with cache.get(*key) as w:
            _check(w, experts[key], torch.float32)
    assert cache.resize(len(keys), packed=True) == len(keys) and cache._packed is not None
    for key in order:
        with cache.get(*key) as w:
            _check(w, experts[key], torch.float32)
    with pytest.raises(ValueError, match="packed"):
        ExpertCache(store, manifest, 2, "cpu", torch.float32, "lru", packed=True)
    store.close()


def test_all_resident_plan_packs_the_experts(tmp_path):
    folder = write_moe(tmp_path / "moe", num_experts=4)
    plan = dry_run_plan(str(folder), {"context_length": 128})
    fixed = plan["dense_bytes"] + plan["kv_cache_bytes"] + plan["scratch_bytes"]
    assert plan["packed"] and plan["slots"] == plan["expert_keys"]
    assert plan["all_resident_bytes"] - fixed <= plan["expert_keys"] * plan["slot_bytes"]
    with Engine.load(str(folder), device="cpu", context_length=128,
                     memory_budget=plan["all_resident_bytes"]) as e:
        assert e.runtime.plan.packed and e.runtime.all_resident
        assert e.runtime.resident_bytes() <= plan["all_resident_bytes"]
        ref = greedy(e)
    below = plan["all_resident_bytes"] - 1
    with Engine.load(str(folder), device="cpu", context_length=128, memory_budget=below) as e:
        assert not e.runtime.plan.packed and e.runtime.plan.slots < plan["expert_keys"]
        assert greedy(e) == ref


@pytest.mark.real
@pytest.mark.slow
def test_default_moe_budget_moves_and_answers_stay():
    from edge_readme import registry

    path = str(registry.pull("smollm2-135m-readme"))
    plan = dry_run_plan(path, {"context_length": 256})
    with Engine.load(path, device="cpu", context_length=256, threads=1) as e:
        assert e.runtime.plan.packed  # every expert resident, each in a slot of its size
        assert e.runtime.resident_bytes() <= plan["all_resident_bytes"]
        ref = greedy(e, "The capital of France is", n=24)
        for budget in (plan["minimum_bytes"], (plan["minimum_bytes"] + plan["all_resident_bytes"])
                       // 2, plan["all_resident_bytes"]):
            got = e.set_memory_budget(budget)
            assert e.runtime.resident_bytes() <= budget
            assert got["packed"] == (budget >= plan["all_resident_bytes"])
            assert greedy(e, "The capital of France is", n=24) == ref
