"""The golden test: the budget-limited, prefetching runtime yields exactly the tokens of a naive
all-in-memory reference, at every budget from the minimum up and under every cache policy."""

from __future__ import annotations

import contextlib
import shutil

import pytest
import torch

from edge_readme import BudgetTooSmallError, Engine, ExpertFileError, quant
from edge_readme.experts_format import read_manifest
from edge_readme.loader import load_model
from edge_readme.model import ExpertWeights, KVCache, build_transformer
from edge_readme.router import Router
from edge_readme.runtime import dry_run_plan
from tests.tiny_models import write_moe_in

PROMPTS = ["the theory of heat", " a tiny test, then another one", "on and on"]
POLICIES = ["belady", "lru", "lfu", "fifo"]


class InMemoryExperts:
    """The naive reference provider: every expert read fully into memory up front (q4 experts
    decoded into int4 kernel weights, float ones as float32)."""

    def __init__(self, folder):
        from safetensors.torch import load_file

        from edge_readme.quant import experts as qe

        m = read_manifest(folder)
        raw = load_file(str(m.path))
        self.w = {}
        for e in m.entries:
            t = raw[f"layers.{e.layer}.experts.{e.expert}"]
            if m.expert_format == "q4":
                views = qe.Layout(e.rows, m.hidden_size).views(t)
                kdt = quant.act_dtype("q4", torch.device("cpu"))
                sz = torch.empty(qe.Layout(e.rows, m.hidden_size).scale_zero_numel(), dtype=kdt)
                gu, dn = qe.weights(views, qe.scale_zero_into(views, sz))
            else:
                gu, dn = t[:2].float().reshape(-1, t.shape[2]), t[2].float().t()
            self.w[e.key] = ExpertWeights(gate_up=gu, down=dn)

    @contextlib.contextmanager
    def get(self, layer, expert):
        yield self.w[(layer, expert)]


def reference_tokens(folder, prompt_ids, n, fmt):
    """Greedy tokens from a plain forward: all experts in memory, no expert cache, no prefetch,
    the router recomputed over the whole sequence each step (no incremental router state). The
    backbone keeps its own KV cache and decodes one token at a time, as the runtime does, so the
    same attention kernels run (a bfloat16 KV cache rounds the one-query path differently)."""
    lm = load_model(folder)
    c = lm.config
    model = build_transformer(c, lm.tensors, "cpu", torch.float32, rope_length=256, weights=fmt)
    model.attach_experts(InMemoryExperts(folder))
    router = Router.from_tensors(c.moe.router, c.moe.num_experts, c.num_layers, c.moe.routing,
                                 lm.tensors)
    ids, out = list(prompt_ids), []
    kv = KVCache(c, 256, dtype=quant.kv_dtype(fmt, torch.device("cpu")))
    with torch.inference_mode():
        route = router.route(torch.tensor(ids))
        logits = model(torch.tensor(ids), kv, 0, route=route)
        for _ in range(n):
            tok = int(logits[-1].argmax())
            if tok in c.eos_token_ids:
                break
            out.append(tok)
            ids.append(tok)
            route = router.route(torch.tensor(ids))[-1:]  # whole sequence, recomputed
            logits = model(torch.tensor([tok]), kv, len(ids) - 1, route=route)
    return out


@pytest.fixture(scope="module", params=["f32", "q4"])
def fmt(request):
    """Weight format of the run; q4 runs read q4 experts, f32 runs float32 ones."""
    return request.param


@pytest.fixture(scope="module")
def moe(tmp_path_factory, fmt):
    return write_moe_in(tmp_path_factory.mktemp("moe") / "tiny-moe", fmt)


@pytest.fixture(scope="module")
def reference(moe, fmt):
    with Engine.load(str(moe), device="cpu", context_length=128, weights=fmt) as e:
        prompts = [e.tokenizer.encode(p) for p in PROMPTS]
    return {tuple(p): reference_tokens(moe, p, 12, fmt) for p in prompts}


def test_all_resident_engine_equals_naive_reference(moe, fmt, reference):
    with Engine.load(str(moe), device="cpu", context_length=128, weights=fmt) as e:
        assert e.runtime.plan.slots == 12
        for ids, want in reference.items():
            assert e.generate(list(ids), max_tokens=12).token_ids == want


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("slots", [1, 2, 5, 9])
@pytest.mark.parametrize("prefetch", [True, False])
def test_every_budget_and_policy_gives_the_same_tokens(moe, fmt, reference, policy, slots,
                                                      prefetch):
    plan = dry_run_plan(str(moe), {"device": "cpu", "context_length": 128, "weights": fmt})
    budget = plan["minimum_bytes"] + (slots - 1) * plan["slot_bytes"]
    with Engine.load(str(moe), device="cpu", context_length=128, weights=fmt,
                     memory_budget=budget,
                     policy=policy, prefetch=prefetch) as e:
        assert e.runtime.plan.slots == slots
        for ids, want in reference.items():
            r = e.generate(list(ids), max_tokens=12)
            assert r.token_ids == want
            assert r.stats["cache"]["peak_resident_bytes"] <= slots * plan["slot_bytes"]
        assert e.runtime.resident_bytes() <= budget


def test_budget_below_minimum_is_refused_with_the_minimum(moe, fmt):
    plan = dry_run_plan(str(moe), {"device": "cpu", "context_length": 128, "weights": fmt})
    with pytest.raises(BudgetTooSmallError, match="below the minimum") as info:
        Engine.load(str(moe), device="cpu", context_length=128, weights=fmt,
                    memory_budget=plan["minimum_bytes"] - 1)
    assert info.value.minimum_bytes == plan["minimum_bytes"]
    assert "--memory-budget" in str(info.value)


def test_dry_run_plan_fields(moe, fmt):
    plan = dry_run_plan(str(moe), {"device": "cpu", "context_length": 128, "weights": fmt,
                                   "memory_budget": "64MiB"})
    assert plan["budget_bytes"] == 64 * 2**20
    assert plan["minimum_bytes"] < plan["all_resident_bytes"]
    assert plan["slots"] == plan["expert_keys"] == 12


def test_belady_hits_at_least_as_often_as_lru(moe, fmt):
    ratios = {}
    for policy in ("belady", "lru"):
        plan = dry_run_plan(str(moe), {"device": "cpu", "context_length": 128, "weights": fmt})
        budget = plan["minimum_bytes"] + 3 * plan["slot_bytes"]
        with Engine.load(str(moe), device="cpu", context_length=128, weights=fmt,
                         memory_budget=budget,
                         policy=policy, prefetch=False, speculate=0) as e:
            for p in PROMPTS:
                e.generate(p, max_tokens=16)
            ratios[policy] = e.stats()["cache"]["hit_ratio"]
    assert ratios["belady"] >= ratios["lru"]


def test_corrupt_expert_fails_the_request_and_the_engine_stays_usable(moe, fmt, reference,
                                                                     tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(moe, folder)
    m = read_manifest(folder)
    entry = m.entries[5]
    original = (folder / "experts.safetensors").read_bytes()
    broken = bytearray(original)
    broken[entry.offset + 7] ^= 0xFF
    plan = dry_run_plan(str(folder), {"device": "cpu", "context_length": 128, "weights": fmt})
    with Engine.load(str(folder), device="cpu", context_length=128, weights=fmt, verify=True,
                     memory_budget=plan["minimum_bytes"] + plan["slot_bytes"]) as e:
        (folder / "experts.safetensors").write_bytes(bytes(broken))
        errors = []
        for ids in reference:
            try:
                e.generate(list(ids), max_tokens=12)
            except ExpertFileError as err:
                errors.append(err)
        assert errors, "no prompt touched the corrupted expert"
        message = str(errors[0])
        assert f"layer {entry.layer}" in message and f"expert {entry.expert}" in message
        (folder / "experts.safetensors").write_bytes(original)
        for ids, want in reference.items():
            assert e.generate(list(ids), max_tokens=12).token_ids == want


def test_prefix_reuse_across_turns_keeps_tokens_exact(moe, fmt, reference):
    with Engine.load(str(moe), device="cpu", context_length=128, weights=fmt) as e:
        ids, want = next(iter(reference.items()))
        first = e.generate(list(ids), max_tokens=12)
        again = e.generate(list(ids), max_tokens=12)
        assert again.stats["reused_prompt_tokens"] == len(ids) - 1
        assert first.token_ids == again.token_ids == want


def test_int8_resident_weights_keep_offloading_exact(moe, fmt):
    """With int8 dense weights too, every budget gives the all-resident tokens."""
    plan = dry_run_plan(str(moe), {"device": "cpu", "context_length": 128, "quantize": "int8"})
    with Engine.load(str(moe), device="cpu", context_length=128, quantize="int8") as e:
        assert e.runtime.resident_bytes() <= plan["all_resident_bytes"]
        want = [e.generate(p, max_tokens=10).token_ids for p in PROMPTS]
    with Engine.load(str(moe), device="cpu", context_length=128, quantize="int8",
                     memory_budget=plan["minimum_bytes"] + plan["slot_bytes"]) as e:
        assert [e.generate(p, max_tokens=10).token_ids for p in PROMPTS] == want
        assert e.runtime.resident_bytes() <= e.runtime.plan.budget_bytes
