"""Continuous batching: which sequences' tokens go into the next forward pass.

Each step the runtime runs one forward pass over the tokens the scheduler picks: one decoded
token for each chosen running sequence plus prompt chunks of new ones, at most `token_budget`
tokens. Sequences hold a fixed sequence slot (a KV cache) from admission to finish; with no free
slot a request waits in arrival order.

Policies (the comparison points of Read-ME's serving study, behind `--schedule`):
- fcfs: running sequences in arrival order, each takes its work until the token budget is spent.
- decode-first: every decode token first, then prompt chunks with what is left.
- prefill-first: while any prompt is unread, steps carry prompt chunks only; then decodes.
- expert-aware (Read-ME): the pre-gating router has already given the expert path of every
  queued token (prompt chunks, and each running sequence's next token), so the step is chosen to
  bound the distinct experts per layer at `expert_cap`: work whose experts are already in the step
  joins first; work that would push a layer past the cap waits. With `resident` given (an expert
  cache that cannot hold every expert), the cap counts only experts that would have to be
  loaded: a resident expert costs the step no load. Fairness bound: a running sequence with work
  is left out of at most `fairness` consecutive steps (then it is forced in, cap or not), so every
  running sequence advances at least once every fairness + 1 steps.

The scheduler knows token ids and expert paths, never logits, sampling, text or HTTP.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .errors import EdgeReadmeError

POLICIES = ("fcfs", "decode-first", "prefill-first", "expert-aware")


@dataclass(eq=False)
class Seq:
    """One request as the scheduler sees it."""

    prompt: list[int]
    handle: Any = None  # the caller's request object
    path: torch.Tensor | None = None  # [len(prompt), L] expert path of the prompt, if MoE
    slot: int | None = None
    fed: int = 0  # tokens of the prompt already in the slot's KV cache
    next_token: int | None = None  # a decoded token not yet fed
    next_path: torch.Tensor | None = None  # [1, L] its expert path
    waited: int = 0  # consecutive steps left out while it had work
    max_waited: int = 0

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)

    def has_work(self) -> bool:
        return self.prefilling or self.next_token is not None

    def work(self, limit: int) -> tuple[list[int], torch.Tensor | None]:
        """Up to `limit` tokens to feed next, with their expert paths ([T, L] or None)."""
        if self.prefilling:
            end = min(len(self.prompt), self.fed + limit)
            path = None if self.path is None else self.path[self.fed:end]
            return self.prompt[self.fed:end], path
        return [self.next_token], self.next_path


@dataclass
class Item:
    seq: Seq
    tokens: list[int]


@dataclass
class Scheduler:
    policy: str
    max_batch: int
    token_budget: int
    fairness: int = 4
    expert_cap: int | None = None  # distinct experts per layer per step (expert-aware)
    exact: bool = False  # each item is its own forward pass: chunks as a request run alone
    resident: Callable[[tuple[int, int]], bool] | None = None  # (layer, expert) held in memory
    choose_slot: Callable[[list[int], list[int]], int] = lambda ids, free: free[0]
    waiting: collections.deque = field(default_factory=collections.deque)
    running: list[Seq] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise EdgeReadmeError(f"--schedule: unknown {self.policy!r}; use one of "
                                  + ", ".join(POLICIES))
        self.token_budget = max(1, self.token_budget)

    # ------------------------------------------------------------------ membership

    def add(self, seq: Seq) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Seq) -> None:
        """Drop a finished or cancelled sequence; its slot is free for the next step."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.slot = None

    def admit(self) -> list[Seq]:
        """Move waiting sequences into free slots, in arrival order; the ones admitted."""
        used = {s.slot for s in self.running}
        free = [i for i in range(self.max_batch) if i not in used]
        admitted = []
        while self.waiting and free:
            seq = self.waiting.popleft()
            seq.slot = self.choose_slot(seq.prompt, free)
            free.remove(seq.slot)
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ the next batch

    def next_batch(self) -> list[Item]:
        ready = [s for s in self.running if s.has_work()]
        if not ready:
            return []
        pick = getattr(self, "_" + self.policy.replace("-", "_"))
        items = pick(ready)
        chosen = {id(i.seq) for i in items}
        for s in ready:
            s.waited = 0 if id(s) in chosen else s.waited + 1
            s.max_waited = max(s.max_waited, s.waited)
        return items

    def _take(self, seqs: Sequence[Seq], budget: int) -> tuple[list[Item], int]:
        items = []
        for s in seqs:
            if budget <= 0:
                break
            toks, _ = s.work(budget)
            items.append(Item(s, toks))
            budget -= 0 if self.exact else len(toks)
        return items, budget

    def _fcfs(self, ready: list[Seq]) -> list[Item]:
        return self._take(ready, self.token_budget)[0]

    def _decode_first(self, ready: list[Seq]) -> list[Item]:
        dec = [s for s in ready if not s.prefilling]
        items, left = self._take(dec, self.token_budget)
        return items + self._take([s for s in ready if s.prefilling], left)[0]

    def _prefill_first(self, ready: list[Seq]) -> list[Item]:
        pre = [s for s in ready if s.prefilling]
        return self._take(pre or ready, self.token_budget)[0]

    def _expert_aware(self, ready: list[Seq]) -> list[Item]:
        if ready[0].work(1)[1] is None:  # a dense model has no paths: decode-first
            return self._decode_first(ready)
        layers = ready[0].work(1)[1].shape[1]
        cap = self.expert_cap or 1 << 30
        used: list[set[int]] = [set() for _ in range(layers)]
        items: list[Item] = []
        budget = self.token_budget

        def add(s: Seq, toks: list[int], path: torch.Tensor) -> None:
            nonlocal budget
            for layer in range(layers):
                used[layer].update(self._counted(layer, path[:, layer].tolist()))
            items.append(Item(s, toks))
            budget -= 0 if self.exact else len(toks)

        forced = [s for s in ready if s.waited >= self.fairness]
        for s in forced:  # the fairness bound first, whatever the cap
            if budget > 0:
                add(s, *s.work(budget))
        rest = [s for s in ready if s.waited < self.fairness]
        while budget > 0 and rest:
            # the work that adds the fewest new experts; decodes before prompts; then the
            # longest waiting, then arrival
            def cost(s: Seq) -> tuple[int, bool, int]:
                _, path = s.work(budget)
                new = sum(len(self._counted(i, path[:, i].tolist()) - used[i])
                          for i in range(layers))
                return new, s.prefilling, -s.waited
            s = min(rest, key=cost)
            rest.remove(s)
            toks, path = s.work(budget)
            n = self._fits(path, used, cap)
            if self.exact and n < len(toks):
                n = 0  # no cut prompt chunks: the same chunks as the request alone
            if n == 0 and items:
                continue
            add(s, toks[:max(n, 1)], path[:max(n, 1)])
        return items

    def _counted(self, layer: int, experts: list[int]) -> set[int]:
        """The experts that count against the cap: all, or only those not resident."""
        if self.resident is None:
            return set(experts)
        return {e for e in experts if not self.resident((layer, e))}

    def _fits(self, path: torch.Tensor, used: list[set[int]], cap: int) -> int:
        """How many leading tokens of `path` keep every layer within `cap` counted experts."""
        seen = [set(u) for u in used]
        for t, row in enumerate(path.tolist()):
            for layer, e in enumerate(row):
                if e in seen[layer] or not self._counted(layer, [e]):
                    continue
                seen[layer].add(e)
                if len(seen[layer]) > cap:
                    return t
        return path.shape[0]


def distinct_experts(paths: Sequence[torch.Tensor]) -> float:
    """Mean over layers of the distinct experts the given token paths ([T, L] each) touch."""
    cols = list(zip(*(row for p in paths for row in p.tolist())))  # per layer (Python: a step
    return sum(len(set(c)) for c in cols) / len(cols)  # logs this; 30 torch.unique cost 0.4 ms)
