"""The CUDA path: pinned staging buffers, the copy stream and per-slot events, the budget counted
by the allocator, and exactness across budgets. Skipped where no CUDA device is present; run by
benchmarks/device_check.sh on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from edge_readme import Engine
from edge_readme.runtime import dry_run_plan
from tests.tiny_models import write_moe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
PROMPTS = ["the theory of heat", " a tiny test, then another one"]


@pytest.fixture(scope="module", params=["f16", "q4"])
def case(request, tmp_path_factory):
    fmt = request.param
    folder = write_moe(tmp_path_factory.mktemp("cuda") / "moe", num_experts=4, layers=3,
                       dtype="q4" if fmt == "q4" else torch.float16)
    return folder, fmt


def _tokens(folder, fmt, **kw):
    with Engine.load(str(folder), device="cuda", weights=fmt, context_length=128, **kw) as e:
        out = [e.generate(p, max_tokens=10).token_ids for p in PROMPTS]
        rt = e.runtime
        report = rt.memory_report()
        return out, rt, report


def test_staging_is_pinned_and_copies_use_their_own_stream(case):
    folder, fmt = case
    plan = dry_run_plan(str(folder), {"device": "cuda", "weights": fmt, "context_length": 128})
    with Engine.load(str(folder), device="cuda", weights=fmt, context_length=128,
                     memory_budget=plan["minimum_bytes"] + plan["slot_bytes"]) as e:
        cache = e.runtime.cache
        e.generate(PROMPTS[0], max_tokens=4)
        staging = cache._staging.get()
        cache._staging.put(staging)
        assert staging.host.is_pinned()
        assert cache._copy_stream is not None
        assert cache._copy_stream != torch.cuda.current_stream()
        assert len(cache._ready_events) == cache.num_slots


@pytest.mark.parametrize("policy", ["belady", "lru"])
@pytest.mark.parametrize("extra", [0, 2, 5])
def test_every_budget_gives_the_all_resident_tokens_on_cuda(case, policy, extra):
    folder, fmt = case
    want, _, _ = _tokens(folder, fmt)
    plan = dry_run_plan(str(folder), {"device": "cuda", "weights": fmt, "context_length": 128})
    budget = plan["minimum_bytes"] + extra * plan["slot_bytes"]
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    got, rt, report = _tokens(folder, fmt, memory_budget=budget, policy=policy)
    assert got == want
    assert rt.resident_bytes() <= budget
    # what the allocator handed out, over what was allocated before the engine: the budget
    assert report["cuda_peak_allocated_bytes"] - base <= budget
