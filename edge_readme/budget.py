"""Memory budgets: parse the `--memory-budget` flag, measure free memory, and split a budget.

The plan decides how many expert slots fit beside the dense weights, KV cache and scratch space.
It knows sizes only; it never allocates and knows nothing about files or policies.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import psutil
import torch

from edge_readme.errors import BudgetError, BudgetTooSmallError

MIB = 1024 * 1024
DEFAULT_RESERVE_BYTES = 512 * MIB

_UNITS = {
    "B": 1,
    "kB": 1000, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
    "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4,
}
_BUDGET_RE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(?: ?([A-Za-z]+))?")
_ACCEPTED = (
    "accepted forms: 'auto', plain bytes like '1073741824', or a positive number with a unit "
    "like '512MiB', '1.5GiB', '800 MB' (units: B, kB, KB, MB, GB, TB = powers of 1000; "
    "KiB, MiB, GiB, TiB = powers of 1024)"
)


def parse_budget(text: str) -> int | None:
    """'auto' -> None; '512MiB' -> 536870912. Anything else raises BudgetError."""
    stripped = text.strip()
    if stripped.lower() == "auto":
        return None
    match = _BUDGET_RE.fullmatch(stripped)
    if match is None or (match.group(2) is not None and match.group(2) not in _UNITS):
        raise BudgetError(f"memory budget: cannot parse {text!r}; {_ACCEPTED}")
    number, unit = match.group(1), match.group(2) or "B"
    if unit == "B" and "." in number:
        raise BudgetError(f"memory budget: {text!r} is a fractional byte count; {_ACCEPTED}")
    value = int(number) if "." not in number else float(number)
    total = int(value * _UNITS[unit])
    if total <= 0:
        raise BudgetError(f"memory budget: {text!r} is not a positive size; {_ACCEPTED}")
    return total


def format_bytes(n: int) -> str:
    """1.5 * 2**30 -> '1.5 GiB'; binary units with one decimal."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def format_flag(n: int) -> str:
    """Bytes as a flag value that parse_budget accepts and that is >= n, e.g. '143MiB'."""
    return f"{math.ceil(n / MIB)}MiB"


def auto_budget(device: torch.device, reserve_bytes: int = DEFAULT_RESERVE_BYTES) -> int:
    """Free memory on `device` minus a reserve for the OS, the allocator and other programs."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
    elif device.type == "mps":
        free = torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory()
    else:
        free = psutil.virtual_memory().available
    budget = int(free) - reserve_bytes
    if budget <= 0:
        raise BudgetError(
            f"memory budget 'auto': {device} has {format_bytes(free)} free, less than the "
            f"{format_bytes(reserve_bytes)} reserve; free memory or pass --memory-budget explicitly"
        )
    return budget


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """How a budget is split. All sizes in bytes; `slots` expert slots of `slot_bytes` each."""

    budget_bytes: int
    dense_bytes: int
    kv_cache_bytes: int
    scratch_bytes: int
    slot_bytes: int
    slots: int
    minimum_bytes: int
    all_resident_bytes: int
    packed: bool = False  # all experts resident, each in a slot of its own size

    @property
    def all_resident(self) -> bool:
        return self.budget_bytes >= self.all_resident_bytes

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return json.dumps(self.to_json())


def plan_memory(
    dense_bytes: int,
    expert_slot_bytes: int,
    num_expert_keys: int,
    kv_cache_bytes: int,
    scratch_bytes: int,
    budget_bytes: int,
    min_slots: int = 1,
    packed_bytes: int | None = None,
) -> MemoryPlan:
    """Fit as many expert slots as the budget allows: at least min_slots, at most one per key.

    packed_bytes: every expert in a slot of its own size (experts differ in size; a cache slot
    fits the largest). A budget that holds that packing holds every expert (`packed`)."""
    fixed = dense_bytes + kv_cache_bytes + scratch_bytes
    minimum = fixed + min_slots * expert_slot_bytes
    all_resident = fixed + num_expert_keys * expert_slot_bytes
    if packed_bytes is not None and num_expert_keys:
        all_resident = min(all_resident, fixed + packed_bytes)
        minimum = min(minimum, all_resident)
    if budget_bytes < minimum:
        raise BudgetTooSmallError(
            f"memory budget {budget_bytes / MIB:.1f} MiB is below the minimum "
            f"{minimum / MIB:.1f} MiB (dense {format_bytes(dense_bytes)} + KV cache "
            f"{format_bytes(kv_cache_bytes)} + scratch {format_bytes(scratch_bytes)}"
            + (f" + {min_slots} expert slot(s) of {format_bytes(expert_slot_bytes)}"
               if expert_slot_bytes else "") + "); "
            f"pass at least --memory-budget {format_flag(minimum)} (memory_budget="
            f"\"{format_flag(minimum)}\" in the Python API) or shorten the context",
            minimum_bytes=minimum,
            budget_bytes=budget_bytes,
        )
    slots, packed = 0, False
    if expert_slot_bytes:
        slots = min(num_expert_keys, (budget_bytes - fixed) // expert_slot_bytes)
        if packed_bytes is not None and budget_bytes >= fixed + packed_bytes:
            slots, packed = num_expert_keys, True
    return MemoryPlan(
        budget_bytes=budget_bytes,
        dense_bytes=dense_bytes,
        kv_cache_bytes=kv_cache_bytes,
        scratch_bytes=scratch_bytes,
        slot_bytes=expert_slot_bytes,
        slots=slots,
        minimum_bytes=minimum,
        all_resident_bytes=all_resident,
        packed=packed,
    )
