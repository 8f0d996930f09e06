"""One memory budget for several models: each model's share, from each model's own plan.

Every model first gets its minimum (`plan_for`'s dense weights + KV cache + scratch + one expert
slot: the `minimum_bytes` of its MemoryPlan); a budget below the sum is refused with that sum.
The rest buys expert slots, shared by weight: by default each model's expert bytes (so each holds
the same fraction of its experts), or, to follow traffic, each model's queued requests times its
expert bytes, so an idle model keeps one slot and gives the others its share (`by_queue`).
Slots past a model's expert count go back to the pool (water-filling). Each model's engine is
then built with its share as its own `memory_budget`, so the plan math stays in `plan_for` /
`plan_memory`; this module only divides bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from ..budget import MIB, format_bytes, format_flag
from ..errors import BudgetTooSmallError


@dataclass(frozen=True)
class ModelNeeds:
    """What one model's plan asks of a budget (from `runtime.dry_run_plan` at no cap)."""

    name: str
    minimum_bytes: int  # dense + KV + scratch + one expert slot
    slot_bytes: int  # one expert slot (0 for a dense model)
    keys: int  # expert slots that would hold every expert

    @classmethod
    def from_plan(cls, name: str, plan: Mapping) -> "ModelNeeds":
        return cls(name, int(plan["minimum_bytes"]), int(plan["slot_bytes"]),
                   int(plan.get("expert_keys", 0)))


def measure(models: Sequence[str], engine_kwargs: dict,
            plan: Callable[[str, dict], dict] | None = None) -> list[ModelNeeds]:
    """Each model's needs, from its dry-run plan with no cap (weights are read, not placed)."""
    if plan is None:
        from ..runtime import dry_run_plan as plan
    kw = {**engine_kwargs, "memory_budget": None}
    return [ModelNeeds.from_plan(m, plan(m, kw)) for m in models]


def split(budget: int, needs: Sequence[ModelNeeds],
          weights: Mapping[str, float] | None = None) -> dict[str, int]:
    """Bytes of `budget` for each model: its minimum plus expert slots bought by weight."""
    minimum = sum(n.minimum_bytes for n in needs)
    if budget < minimum:
        parts = ", ".join(f"{n.name} {format_bytes(n.minimum_bytes)}" for n in needs)
        raise BudgetTooSmallError(
            f"memory budget {budget / MIB:.1f} MiB is below the minimum {minimum / MIB:.1f} MiB "
            f"for {len(needs)} models (each one's dense part, KV cache, scratch and one expert "
            f"slot: {parts}); pass at least --memory-budget {format_flag(minimum)} or serve "
            "fewer models", minimum_bytes=minimum, budget_bytes=budget)
    if weights is None or not any(weights.get(n.name, 0) > 0 for n in needs):
        weights = {n.name: n.keys * n.slot_bytes for n in needs}
    extra = {n.name: 0 for n in needs}  # slots beyond the first
    room = {n.name: max(0, n.keys - 1) if n.slot_bytes else 0 for n in needs}
    free = budget - minimum
    while True:  # water-filling: a model that is full hands its share to the others
        open_ = [n for n in needs if extra[n.name] < room[n.name] and weights.get(n.name, 0) > 0]
        total = sum(weights[n.name] for n in open_)
        if not open_ or total <= 0:
            break
        bought = 0
        for n in open_:
            share = int(free * weights[n.name] / total)
            k = min(room[n.name] - extra[n.name], share // n.slot_bytes)
            extra[n.name] += k
            bought += k * n.slot_bytes
        free -= bought
        if bought == 0:
            break
    for n in sorted(needs, key=lambda n: n.slot_bytes or 1 << 62):  # crumbs: one slot at a time
        while n.slot_bytes and extra[n.name] < room[n.name] and free >= n.slot_bytes \
                and weights.get(n.name, 0) > 0:
            extra[n.name] += 1
            free -= n.slot_bytes
    return {n.name: n.minimum_bytes + extra[n.name] * n.slot_bytes for n in needs}


def by_queue(budget: int, needs: Sequence[ModelNeeds],
             queued: Mapping[str, int]) -> dict[str, int]:
    """The split that follows traffic: models with nothing queued keep their minimum; the
    others share the rest by queued requests x expert bytes (no traffic at all: the default)."""
    weights = {n.name: queued.get(n.name, 0) * n.keys * n.slot_bytes for n in needs}
    return split(budget, needs, weights)


def slots(shares: Mapping[str, int], needs: Sequence[ModelNeeds]) -> dict[str, int]:
    """Expert slots each share buys (the same count `plan_memory` gives at that budget)."""
    return {n.name: 1 + (shares[n.name] - n.minimum_bytes) // n.slot_bytes if n.slot_bytes
            else 0 for n in needs}
