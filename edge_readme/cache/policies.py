"""Eviction policies over (layer, expert) keys, the known-future `Lookahead`, and a simulator.

Pure Python and single-purpose: a policy only picks a victim among the candidates it is given
(the cache decides which keys are evictable). No tensors, no I/O, no threads of its own.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict, defaultdict, deque
from collections.abc import Hashable, Iterable, Sequence

from edge_readme.errors import EdgeReadmeError

Key = Hashable  # (layer, expert) in the runtime; anything hashable in the simulator
INF = float("inf")


class UnknownPolicyError(EdgeReadmeError, ValueError):
    """A cache policy name that make_policy does not know."""


class Lookahead:
    """The known future access string; next_use(key) is the distance to its next access.

    Each key keeps a deque of absolute positions; a global cursor marks the head, so next_use is
    O(1) and advance is O(1) amortised. Thread-safe: the engine writes, the prefetcher reads.
    """

    def __init__(self, keys: Iterable[Key] = ()):
        self._lock = threading.Lock()
        self._queue: deque = deque()
        self._positions: dict[Key, deque] = defaultdict(deque)
        self._cursor = 0  # absolute position of the head
        self.extend(keys)

    def extend(self, keys: Iterable[Key]) -> None:
        with self._lock:
            end = self._cursor + len(self._queue)
            for i, key in enumerate(keys):
                self._queue.append(key)
                self._positions[key].append(end + i)

    def advance(self, key: Key) -> None:
        """The access `key` happened: consume it at the head.

        A key further ahead drops everything before it (those accesses were skipped, e.g. a
        mispredicted path); a key not in the lookahead at all leaves it unchanged.
        """
        with self._lock:
            if key not in self._positions:
                return
            while self._queue:
                head = self._pop_head()
                if head == key:
                    return

    def _pop_head(self) -> Key:
        head = self._queue.popleft()
        positions = self._positions[head]
        positions.popleft()
        if not positions:
            del self._positions[head]
        self._cursor += 1
        return head

    def next_use(self, key: Key) -> float:
        """0 if key is the next access, 1 if the one after, ...; inf if not known to recur."""
        with self._lock:
            positions = self._positions.get(key)
            return positions[0] - self._cursor if positions else INF

    def clear(self) -> None:
        with self._lock:
            self._cursor += len(self._queue)
            self._queue.clear()
            self._positions.clear()

    def __len__(self) -> int:
        return len(self._queue)

    def __repr__(self) -> str:
        return f"Lookahead({list(self._queue)[:8]}{'...' if len(self._queue) > 8 else ''})"


class Policy:
    """Interface: the cache reports inserts, hits and evictions, and asks for a victim."""

    name = "base"

    def on_insert(self, key: Key) -> None:
        raise NotImplementedError

    def on_hit(self, key: Key) -> None:
        raise NotImplementedError

    def on_evict(self, key: Key) -> None:
        raise NotImplementedError

    def victim(self, candidates: list[Key], lookahead: Lookahead | None) -> Key:
        raise NotImplementedError


class LRU(Policy):
    """Least recently used: the candidate inserted or hit longest ago."""

    name = "lru"

    def __init__(self):
        self._order: OrderedDict[Key, None] = OrderedDict()  # oldest first

    def on_insert(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_hit(self, key: Key) -> None:
        self._order.move_to_end(key)

    def on_evict(self, key: Key) -> None:
        self._order.pop(key, None)

    def rank(self, key: Key) -> int:
        """Recency rank; lower is older. O(n), used only when picking a victim."""
        return self._index()[key]

    def _index(self) -> dict[Key, int]:
        return {k: i for i, k in enumerate(self._order)}

    def victim(self, candidates: list[Key], lookahead: Lookahead | None = None) -> Key:
        index = self._index()
        return min(candidates, key=index.__getitem__)


class FIFO(LRU):
    """First in, first out: hits do not refresh a key."""

    name = "fifo"

    def on_hit(self, key: Key) -> None:
        pass


class LFU(LRU):
    """Least frequently used while resident (counts reset on eviction); ties go to LRU."""

    name = "lfu"

    def __init__(self):
        super().__init__()
        self._count: dict[Key, int] = {}

    def on_insert(self, key: Key) -> None:
        super().on_insert(key)
        self._count[key] = 1

    def on_hit(self, key: Key) -> None:
        super().on_hit(key)
        self._count[key] += 1

    def on_evict(self, key: Key) -> None:
        super().on_evict(key)
        self._count.pop(key, None)

    def victim(self, candidates: list[Key], lookahead: Lookahead | None = None) -> Key:
        index = self._index()
        return min(candidates, key=lambda k: (self._count[k], index[k]))


class Belady(LRU):
    """Evict the candidate used farthest in the future; keys with no known use go first, by LRU.

    With the whole future this is Belady's MIN (optimal); with a partial lookahead, a heuristic.
    """

    name = "belady"

    def victim(self, candidates: list[Key], lookahead: Lookahead | None) -> Key:
        if lookahead is None:
            return super().victim(candidates)
        index = self._index()
        return max(candidates, key=lambda k: (lookahead.next_use(k), -index[k]))


POLICIES: dict[str, type[Policy]] = {"lru": LRU, "lfu": LFU, "fifo": FIFO, "belady": Belady}


def make_policy(name: str) -> Policy:
    cls = POLICIES.get(name)
    if cls is None:
        raise UnknownPolicyError(
            f"cache policy: expected one of {', '.join(POLICIES)}, found {name!r}; "
            "pick one of those (--cache-policy)"
        )
    return cls()


@dataclasses.dataclass(frozen=True)
class SimResult:
    hits: int
    misses: int
    hit_ratio: float
    evicted: tuple = ()  # victims in eviction order


def simulate(
    trace: Sequence[Key], capacity: int, policy: str, lookahead: int | None = None
) -> SimResult:
    """Replay trace through a cache of `capacity` keys. lookahead=None: the whole future is known
    (belady = MIN); lookahead=k: only the next k accesses after the current one."""
    if capacity < 1:
        raise ValueError(f"simulate: capacity must be >= 1, found {capacity}")
    pol = make_policy(policy)
    window = len(trace) if lookahead is None else lookahead
    future = Lookahead(trace[:window])
    resident: set = set()
    hits, evicted = 0, []
    for i, key in enumerate(trace):
        future.advance(key)
        if window and i + window < len(trace):
            future.extend([trace[i + window]])
        if key in resident:
            hits += 1
            pol.on_hit(key)
            continue
        if len(resident) >= capacity:
            out = pol.victim(list(resident), future)
            resident.discard(out)
            pol.on_evict(out)
            evicted.append(out)
        resident.add(key)
        pol.on_insert(key)
    total = len(trace)
    return SimResult(hits, total - hits, hits / total if total else 0.0, tuple(evicted))
