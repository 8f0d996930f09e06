"""--miss-precision: low-bit expert copies (quant/lowbit.py) served on a miss
(cache/miss_precision.py), their place in the memory plan, and when they fire."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from edge_readme import BudgetTooSmallError, EdgeReadmeError, Engine
from edge_readme.cache import miss_precision as mp
from edge_readme.cli.main import cli
from edge_readme.experts_format import read_manifest
from edge_readme.quant import lowbit, q4
from edge_readme.runtime import dry_run_plan
from tests.tiny_models import write_moe_in

PROMPTS = ["the theory of heat", " a tiny test, then another one", "on and on"]
CTX = {"device": "cpu", "context_length": 128}


# ---- the quantizer and its bit planes --------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_bit_planes_give_back_the_packed_codes(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 1 << bits, (128, 96), generator=g, dtype=torch.uint8)
    packed = q4.pack(q).reshape(-1)
    planes = lowbit.to_planes(packed, bits)
    assert planes.numel() == lowbit.packed_bytes(bits, 128, 96)
    out = torch.full_like(packed, 0xFF)
    lowbit.planes_into(planes, bits, out, torch.empty(packed.numel() // 4, dtype=torch.uint8))
    assert torch.equal(out, packed)


@pytest.mark.parametrize("shape", [(128, 64), (64, 96)])
def test_kernel_form_computes_the_dequantized_matrix_and_error_falls_with_bits(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, shape[1], generator=torch.Generator().manual_seed(1))
    errs = []
    for bits in (2, 3, 4):
        m = lowbit.LowBitMatrix.encode(w, bits)
        assert m.nbytes == lowbit.matrix_nbytes(bits, *shape)
        d = m.dequantize()
        N, K = shape
        kw = m.kernel_into(torch.empty(N * K // 2, dtype=torch.uint8), torch.empty(N * K),
                           torch.empty(N * K // 8, dtype=torch.uint8))
        torch.testing.assert_close(kw(x), x @ d.t(), rtol=1e-4, atol=1e-4)
        errs.append(float((d - w).norm() / w.norm()))
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.1


def test_unknown_precision_is_a_typed_error_naming_the_flag_and_choices():
    with pytest.raises(EdgeReadmeError, match=r"--miss-precision.*'q5'.*q2, q3, q4"):
        lowbit.parse_miss_precision("q5")
    assert lowbit.parse_miss_precision(None) is None


# ---- the runtime -----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["q4", "f32"])
def fmt(request):
    return request.param


@pytest.fixture(scope="module")
def moe(tmp_path_factory, fmt):
    return write_moe_in(tmp_path_factory.mktemp("mp") / "tiny-moe", fmt)


@pytest.fixture(scope="module")
def exact(moe, fmt):
    with Engine.load(str(moe), weights=fmt, **CTX) as e:
        return [e.generate(p, max_tokens=12).token_ids for p in PROMPTS]


def _budget(moe, fmt, slots, precision):
    plan = dry_run_plan(str(moe), {**CTX, "weights": fmt, "miss_precision": precision})
    return plan, plan["minimum_bytes"] + (slots - 1) * plan["slot_bytes"]


def test_engine_refuses_an_unknown_precision(moe, fmt):
    with pytest.raises(EdgeReadmeError, match="--miss-precision.*q2, q3, q4"):
        Engine.load(str(moe), weights=fmt, miss_precision="int2", **CTX)


@pytest.mark.parametrize("precision", ["q2", "q3", "q4"])
def test_the_plan_counts_the_copies_and_resident_bytes_stay_under_budget(moe, fmt, precision):
    m = read_manifest(moe)
    off = dry_run_plan(str(moe), {**CTX, "weights": fmt})
    plan, budget = _budget(moe, fmt, 2, precision)
    extra = plan["dense_bytes"] - off["dense_bytes"]
    assert extra == mp.copies_nbytes(m, precision) > 0
    assert plan["minimum_bytes"] > off["minimum_bytes"]
    with pytest.raises(BudgetTooSmallError) as info:  # the flag-off minimum is too small now
        Engine.load(str(moe), weights=fmt, miss_precision=precision,
                    memory_budget=off["minimum_bytes"], **CTX)
    assert info.value.minimum_bytes == plan["minimum_bytes"]
    with Engine.load(str(moe), weights=fmt, miss_precision=precision, memory_budget=budget,
                     **CTX) as e:
        rt = e.runtime
        assert rt.plan.slots == 2 and rt.miss is not None
        held = sum(a.nbytes + b.nbytes for a, b in rt.miss.copies.copies.values())
        assert held == extra
        kdt = rt.miss.copies._sz.dtype
        scratch = rt.miss.copies.nbytes - held
        assert scratch <= mp.scratch_nbytes(m, kdt)
        for p in PROMPTS:
            e.generate(p, max_tokens=8)
        assert rt.resident_bytes() <= budget


def test_it_fires_under_a_tight_budget_with_cold_storage(moe, fmt):
    _, budget = _budget(moe, fmt, 1, "q2")
    with Engine.load(str(moe), weights=fmt, miss_precision="q2", memory_budget=budget,
                     cold=True, **CTX) as e:
        for p in PROMPTS:
            r = e.generate(p, max_tokens=12)
        s = e.stats()["cache"]
        assert s["low_precision"] > 0
        total = s["hits"] + s["misses"] + s["low_precision"]
        assert s["low_precision_rate"] == pytest.approx(s["low_precision"] / total)
        assert len(r.token_ids) > 0


def test_a_miss_serves_the_copy_and_loads_the_full_expert_for_later(moe, fmt):
    from edge_readme.model import expert_ffn

    _, budget = _budget(moe, fmt, 2, "q3")
    with Engine.load(str(moe), weights=fmt, miss_precision="q3", memory_budget=budget,
                     **CTX) as e:
        rt = e.runtime
        miss, cache = rt.miss, rt.cache
        key = next(k for k in rt.manifest.keys() if not cache.contains(k))
        x = torch.randn(3, rt.config.hidden_size, generator=torch.Generator().manual_seed(0))
        miss.active = True
        before = cache.stats.low_precision
        with miss.get(*key) as w:
            low = expert_ffn(x, w)
        assert cache.stats.low_precision == before + 1
        assert rt.prefetcher.wait_idle(10) and key in cache.resident()  # loaded for later
        hits = cache.stats.hits
        with miss.get(*key) as w:
            full = expert_ffn(x, w)
        assert cache.stats.hits == hits + 1 and cache.stats.low_precision == before + 1
        err = float((low - full).norm() / full.norm())
        assert 0 < err < 0.4, err  # q3: near the full expert (0.24-0.29 here), not equal
        miss.active = False


def test_prefill_waits_for_full_experts(moe, fmt):
    _, budget = _budget(moe, fmt, 1, "q2")
    with Engine.load(str(moe), weights=fmt, miss_precision="q2", memory_budget=budget,
                     **CTX) as e:
        e.generate(PROMPTS[1], max_tokens=1)  # a prefill and no decode step
        assert e.stats()["cache"]["low_precision"] == 0


def test_it_never_fires_when_everything_is_resident_and_tokens_are_exact(moe, fmt, exact):
    with Engine.load(str(moe), weights=fmt, miss_precision="q2", **CTX) as e:
        assert e.runtime.all_resident and e.runtime.miss is None
        assert [e.generate(p, max_tokens=12).token_ids for p in PROMPTS] == exact
        assert e.stats()["cache"]["low_precision"] == 0


@pytest.mark.parametrize("slots", [1, 3])
def test_q4_copies_of_q4_experts_are_exact_even_when_it_fires(moe, fmt, exact, slots):
    """A q4 copy of a q4-stored expert keeps the file's values: identical output."""
    if fmt != "q4":
        pytest.skip("float experts are requantized: only q4 experts have exact q4 copies")
    _, budget = _budget(moe, fmt, slots, "q4")
    with Engine.load(str(moe), weights=fmt, miss_precision="q4", memory_budget=budget,
                     **CTX) as e:
        assert [e.generate(p, max_tokens=12).token_ids for p in PROMPTS] == exact
        if slots == 1:  # one slot for 12 experts: decode steps must miss
            assert e.stats()["cache"]["low_precision"] > 0


@pytest.mark.parametrize("slots", [1, 5])
def test_off_by_default_every_budget_stays_exact(moe, fmt, exact, slots):
    plan = dry_run_plan(str(moe), {**CTX, "weights": fmt})
    budget = plan["minimum_bytes"] + (slots - 1) * plan["slot_bytes"]
    with Engine.load(str(moe), weights=fmt, memory_budget=budget, **CTX) as e:
        assert e.runtime.miss is None
        assert [e.generate(p, max_tokens=12).token_ids for p in PROMPTS] == exact
        assert e.stats()["cache"]["low_precision"] == 0


def test_dense_model_refuses_the_flag(tmp_path):
    from tests.tiny_dense import write_tiny_dense

    folder = write_tiny_dense(tmp_path / "dense")
    with pytest.raises(EdgeReadmeError, match="--miss-precision.*dense"):
        Engine.load(str(folder), miss_precision="q2", **CTX)


# ---- the command line ------------------------------------------------------------------------


def test_cli_rejects_an_unknown_value_naming_the_flag_and_choices(moe):
    res = CliRunner().invoke(cli, ["generate", "hi", "-m", str(moe), "--miss-precision", "q5"])
    assert res.exit_code == 2
    assert "--miss-precision" in res.output and all(q in res.output for q in ("q2", "q3", "q4"))
    assert "Traceback" not in res.output


def test_cli_generate_and_bench_take_the_flag(moe, fmt, tmp_path):
    plan, budget = _budget(moe, fmt, 1, "q2")
    res = CliRunner().invoke(cli, ["generate", "the theory", "-m", str(moe), "--device", "cpu",
                                   "--weights", fmt, "--miss-precision", "q2",
                                   "--memory-budget", str(budget), "--max-tokens", "6",
                                   "--context-length", "128"])
    assert res.exit_code == 0, res.output
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{p}"}}\n' for p in PROMPTS))
    res = CliRunner().invoke(cli, ["bench", "-m", str(moe), "--device", "cpu", "--weights",
                                   fmt, "--miss-precision", "q2", "--budgets", "25%",
                                   "--policies", "belady", "--lookahead", "path",
                                   "--prompts", str(prompts), "--max-tokens", "6",
                                   "--context-length", "128", "-q"])
    assert res.exit_code == 0, res.output
    assert "low-bit" in res.output


def test_per_request_stats_carry_the_fire_rate(moe, fmt):
    _, budget = _budget(moe, fmt, 1, "q2")
    with Engine.load(str(moe), weights=fmt, miss_precision="q2", memory_budget=budget,
                     **CTX) as e:
        e.generate(PROMPTS[0], max_tokens=6)
        r = e.generate(PROMPTS[1], max_tokens=12)
        c = r.stats["cache"]
        uses = c["hits"] + c["misses"] + c["low_precision"]
        assert c["low_precision"] > 0
        assert c["low_precision_rate"] == pytest.approx(c["low_precision"] / uses, abs=1e-4)
        assert r.stats["memory"]["miss_copies_bytes"] == e.runtime.miss.copies.nbytes


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "bench"])
def test_every_model_command_offers_the_flag(command):
    res = CliRunner().invoke(cli, [command, "--help"])
    assert res.exit_code == 0 and "--miss-precision" in res.output
    assert "[q2|q3|q4]" in res.output.replace("\n", "")
