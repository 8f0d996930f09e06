"""The budget figures the README quotes for the default MoE, checked against the tool.

The README's error example ("below the minimum X MiB ... pass at least --memory-budget NMiB")
and its sentence on the float32 / bfloat16 minimum and all-resident sizes must match what
`generate --dry-run` computes today. Needs the default MoE in the model store (marked `real`).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edge_readme import registry
from edge_readme.budget import MIB

README = Path(__file__).resolve().parent.parent / "README.md"
MODEL = "smollm2-135m-readme"

pytestmark = pytest.mark.real


def plan(dtype: str) -> dict:
    from edge_readme.runtime import dry_run_plan

    return dry_run_plan(MODEL, {"dtype": dtype, "device": "cpu", "memory_budget": "64GiB"})


def quoted(pattern: str) -> re.Match:
    m = re.search(pattern, README.read_text(encoding="utf-8"), re.S)
    if m is None:
        pytest.fail(f"README.md no longer quotes /{pattern}/; update this test with the README")
    return m


@pytest.fixture(scope="module")
def plans():
    if not registry.is_present(MODEL):
        pytest.skip(f"{MODEL} is not in the model store (edge-readme pull {MODEL})")
    return {"float32": plan("float32"), "bfloat16": plan("bfloat16")}


def test_error_example_minimum(plans):
    m = quoted(r"below the minimum ([\d.]+) MiB .*?pass at least --memory-budget (\d+)MiB")
    minimum = plans["float32"]["minimum_bytes"] / MIB
    assert float(m.group(1)) == pytest.approx(minimum, abs=0.05), \
        f"README says {m.group(1)} MiB; the tool says {minimum:.1f} MiB"
    assert int(m.group(2)) >= minimum, "the README's suggested flag is below the minimum"


def test_float32_and_bfloat16_sentence(plans):
    m = quoted(r"minimum is (\d+) MiB and everything resident\s+takes ([\d.]+) GiB; "
               r"in bfloat16, (\d+) MiB and (\d+) MiB")
    f32, bf16 = plans["float32"], plans["bfloat16"]
    assert int(m.group(1)) == round(f32["minimum_bytes"] / MIB)
    assert float(m.group(2)) == pytest.approx(f32["all_resident_bytes"] / MIB / 1024, abs=0.005)
    assert int(m.group(3)) == round(bf16["minimum_bytes"] / MIB)
    assert int(m.group(4)) == round(bf16["all_resident_bytes"] / MIB)
