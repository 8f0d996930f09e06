"""The budget figures the README quotes for the default MoE, checked against the tool.

The README's error example ("below the minimum X MiB ... pass at least --memory-budget NMiB",
default weights) and its sentence on the q4 / f32 minimum and all-resident sizes must match what
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


def plan(weights: str) -> dict:
    from edge_readme.runtime import dry_run_plan

    return dry_run_plan(MODEL, {"weights": weights, "device": "cpu", "memory_budget": "64GiB"})


def quoted(pattern: str) -> re.Match:
    m = re.search(pattern, README.read_text(encoding="utf-8"), re.S)
    if m is None:
        pytest.fail(f"README.md no longer quotes /{pattern}/; update this test with the README")
    return m


@pytest.fixture(scope="module")
def plans():
    registry.pull(MODEL)  # fetched or built once into the store, as the other real tests do
    return {"q4": plan("q4"), "f32": plan("f32")}


def test_error_example_minimum(plans):
    m = quoted(r"below the minimum ([\d.]+) MiB .*?pass at least --memory-budget (\d+)MiB")
    minimum = plans["q4"]["minimum_bytes"] / MIB  # the CPU default
    assert float(m.group(1)) == pytest.approx(minimum, abs=0.05), \
        f"README says {m.group(1)} MiB; the tool says {minimum:.1f} MiB"
    assert int(m.group(2)) >= minimum, "the README's suggested flag is below the minimum"


def test_q4_and_f32_sentence(plans):
    m = quoted(r"minimum is (\d+) MiB and everything resident takes\s+(\d+) MiB at a "
               r"2048-token context; in f32, (\d+) MiB and ([\d.]+) GiB")
    q4, f32 = plans["q4"], plans["f32"]
    assert int(m.group(1)) == round(q4["minimum_bytes"] / MIB)
    assert int(m.group(2)) == round(q4["all_resident_bytes"] / MIB)
    assert int(m.group(3)) == round(f32["minimum_bytes"] / MIB)
    assert float(m.group(4)) == pytest.approx(f32["all_resident_bytes"] / MIB / 1024, abs=0.005)
