import pytest
import torch

from edge_readme.budget import MemoryPlan, auto_budget, format_bytes, parse_budget, plan_memory
from edge_readme.errors import BudgetError, BudgetTooSmallError

MIB = 1024 * 1024


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MiB", 512 * MIB),
        ("1.5GiB", 3 * 512 * MIB),
        ("800MB", 800_000_000),
        ("800 MB", 800_000_000),
        ("1073741824", 1073741824),
        ("10B", 10),
        ("2kB", 2000),
        ("2KB", 2000),
        ("3KiB", 3072),
        ("1GB", 10**9),
        ("1TB", 10**12),
        ("1TiB", 1024**4),
        (" 64 MiB ", 64 * MIB),
        ("auto", None),
    ],
)
def test_parse_budget_valid(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize(
    "text",
    ["12XB", "-1GB", "abc", "0", "", "1e9", "0MiB", "1.5", "5  MiB", "MiB", "1 GiB x", "1mib"],
)
def test_parse_budget_invalid_lists_forms(text):
    with pytest.raises(BudgetError, match="accepted forms.*512MiB"):
        parse_budget(text)


def test_format_bytes():
    assert format_bytes(512 * MIB) == "512.0 MiB"
    assert format_bytes(100) == "100.0 B"
    assert format_bytes(3 * 512 * MIB) == "1.5 GiB"


def test_auto_budget_cpu_is_positive():
    assert auto_budget(torch.device("cpu"), reserve_bytes=0) > 0


def test_auto_budget_reserve_too_large():
    with pytest.raises(BudgetError, match="reserve"):
        auto_budget(torch.device("cpu"), reserve_bytes=1 << 60)


def test_plan_memory_slots_and_fields():
    plan = plan_memory(
        dense_bytes=100 * MIB, expert_slot_bytes=10 * MIB, num_expert_keys=12,
        kv_cache_bytes=20 * MIB, scratch_bytes=5 * MIB, budget_bytes=180 * MIB, min_slots=2,
    )
    assert isinstance(plan, MemoryPlan)
    assert plan.slots == 5
    assert plan.minimum_bytes == 145 * MIB
    assert plan.all_resident_bytes == 245 * MIB
    assert plan.to_json()["slots"] == 5
    big = plan_memory(100 * MIB, 10 * MIB, 12, 20 * MIB, 5 * MIB, 10_000 * MIB, 2)
    assert big.slots == 12 and big.all_resident


def test_plan_memory_refuses_below_minimum():
    with pytest.raises(BudgetTooSmallError, match=r"--memory-budget 143MiB") as info:
        plan_memory(100 * MIB, 10 * MIB + 1, 12, 20 * MIB, 2 * MIB, 130 * MIB, 2)
    assert "130.0 MiB" in str(info.value) and "142.0 MiB" in str(info.value)
    assert info.value.minimum_bytes == 142 * MIB + 2
    assert info.value.budget_bytes == 130 * MIB
    assert parse_budget("143MiB") >= info.value.minimum_bytes
