"""One memory budget for several models: each model's share, from each model's own plan.

Every model first gets its minimum (`plan_for`'s dense weights + KV cache + scratch + one expert
slot: the `minimum_bytes` of its MemoryPlan); a budget below the sum is refused with that sum.
The rest buys expert slots, shared by weight: by default each model's expert bytes (so each holds
the same fraction of its experts), or, to follow traffic, each model's queued requests times its
expert bytes, so an idle model keeps one slot and gives the others its share (`by_queue`);
`Rebalancer` applies that split to the running engines as traffic shifts.
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
    all_resident_bytes: int = 0  # every expert resident (packed by size on the CPU); 0: unknown

    @classmethod
    def from_plan(cls, name: str, plan: Mapping) -> "ModelNeeds":
        return cls(name, int(plan["minimum_bytes"]), int(plan["slot_bytes"]),
                   int(plan.get("expert_keys", 0)), int(plan.get("all_resident_bytes", 0)))

    def room(self) -> int:
        """Slots past the first that it can use: up to one per expert, or fewer where every
        expert fits packed in less."""
        if not self.slot_bytes:
            return 0
        room = max(0, self.keys - 1)
        if self.all_resident_bytes:
            room = min(room, -(-(self.all_resident_bytes - self.minimum_bytes)
                               // self.slot_bytes))
        return room

    def share(self, extra: int) -> int:
        """Bytes for its minimum plus `extra` slots (all resident: no more than that needs)."""
        nbytes = self.minimum_bytes + extra * self.slot_bytes
        if self.all_resident_bytes and extra >= self.room():
            nbytes = min(nbytes, max(self.all_resident_bytes, self.minimum_bytes))
        return nbytes


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
    room = {n.name: n.room() for n in needs}
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
    return {n.name: n.share(extra[n.name]) for n in needs}


def by_queue(budget: int, needs: Sequence[ModelNeeds],
             queued: Mapping[str, int]) -> dict[str, int]:
    """The split that follows traffic: models with nothing queued keep their minimum; the
    others share the rest by queued requests x expert bytes (no traffic at all: the default)."""
    weights = {n.name: queued.get(n.name, 0) * n.keys * n.slot_bytes for n in needs}
    return split(budget, needs, weights)


def slots(shares: Mapping[str, int], needs: Sequence[ModelNeeds]) -> dict[str, int]:
    """Expert slots each share buys (the same count `plan_memory` gives at that budget)."""
    out = {}
    for n in needs:
        share = shares[n.name]
        if not n.slot_bytes:
            out[n.name] = 0
        elif n.all_resident_bytes and share >= n.all_resident_bytes:
            out[n.name] = n.keys  # packed: every expert
        else:
            out[n.name] = min(n.keys, 1 + (share - n.minimum_bytes) // n.slot_bytes)
    return out


class Rebalancer:
    """Moves expert slots between running models as their traffic shifts, under one budget.

    Every `every_s` seconds it reads how many requests each model has queued or running, and
    applies `by_queue`'s split when it would change some model's slot count. A model counts as
    busy until it has had nothing in flight for `idle_s` seconds, so a user who sends one
    request after another does not lose the model's experts between them. Shrinks are applied
    before grows, and each shrink has handed its memory back before the next model grows
    (`Engine.set_memory_budget`), so the shares never add up past the budget. Which experts a
    shrinking model drops is its cache's policy over the future it knows (Belady over its queue).
    `apply(name, bytes)` makes the change; a failure is kept in `last_error` and the old share
    stays in force for that model."""

    def __init__(self, budget: int, needs: Sequence[ModelNeeds], shares: dict[str, int],
                 inflight: Callable[[], Mapping[str, int]],
                 apply: Callable[[str, int], None], every_s: float = 1.0, idle_s: float = 5.0,
                 clock: Callable[[], float] | None = None):
        import time

        self.budget, self.needs, self.shares = budget, list(needs), shares
        self.inflight, self.apply = inflight, apply
        self.every_s, self.idle_s = every_s, idle_s
        self.clock = clock or time.monotonic
        self.last_busy: dict[str, float] = {}
        self.moves = 0
        self.last_error: BaseException | None = None
        self._stop = None
        self._thread = None

    def wanted(self) -> dict[str, int]:
        now, live = self.clock(), self.inflight()
        queued = {}
        for n in self.needs:
            if live.get(n.name, 0) > 0:
                self.last_busy[n.name] = now
            recent = now - self.last_busy.get(n.name, -1e18) < self.idle_s
            queued[n.name] = max(live.get(n.name, 0), int(recent))
        return by_queue(self.budget, self.needs, queued)

    def tick(self) -> bool:
        """Apply the split traffic asks for now; True if slots moved."""
        target = self.wanted()
        now, want = slots(self.shares, self.needs), slots(target, self.needs)
        movable = [n.name for n in self.needs if n.slot_bytes and want[n.name] != now[n.name]]
        if not movable:
            return False
        movable.sort(key=lambda m: target[m] > self.shares[m])  # shrinks first
        for name in movable:
            try:
                self.apply(name, target[name])
            except Exception as e:  # the model keeps its share; a grow after it would overrun
                self.last_error = e
                return False
            self.shares[name] = target[name]
        self.moves += 1
        return True

    def start(self) -> None:
        import threading

        self._stop = threading.Event()

        def loop() -> None:
            while not self._stop.wait(self.every_s):
                self.tick()

        self._thread = threading.Thread(target=loop, name="edge-readme-rebalance", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join()
            self._stop = None
