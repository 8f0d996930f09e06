import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_readme.cache.policies import (
    INF,
    Lookahead,
    UnknownPolicyError,
    make_policy,
    simulate,
)
from edge_readme.errors import EdgeReadmeError

CLASSIC = [1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("policy", "misses"), [("belady", 7), ("fifo", 9), ("lru", 10), ("lfu", 10)]
)
def test_classic_access_string(policy, misses):
    result = simulate(CLASSIC, 3, policy)
    assert result.misses == misses
    assert result.hits == len(CLASSIC) - misses
    assert result.hit_ratio == pytest.approx((12 - misses) / 12)


def test_belady_eviction_order():
    # 4 evicts 3 (next use farthest); 5 evicts 4; 3 evicts 1 (1 and 2 never recur, 1 is older);
    # 4 evicts 2 (2 and 3 never recur, 2 is older).
    assert simulate(CLASSIC, 3, "belady").evicted == (3, 4, 1, 2)


def test_fifo_and_lru_eviction_order():
    assert simulate(CLASSIC, 3, "fifo").evicted == (1, 2, 3, 4, 1, 2)
    assert simulate(CLASSIC, 3, "lru").evicted[:3] == (1, 2, 3)


def test_lfu_prefers_rarely_used_then_lru():
    # a hit twice, b once, c once: d evicts b (count 1, older than c).
    assert simulate(["a", "a", "b", "c", "d"], 3, "lfu").evicted == ("b",)
    assert simulate(["a", "a", "b", "c", "d"], 3, "lru").evicted == ("a",)


def test_belady_with_short_lookahead_falls_back_to_lru_among_unknown():
    # lookahead 1 at the access of 4 sees only [1]: 2 and 3 are unknown, 2 is older.
    assert simulate(CLASSIC, 3, "belady", lookahead=1).evicted[0] == 2
    assert simulate(CLASSIC, 3, "belady", lookahead=0).misses == simulate(CLASSIC, 3, "lru").misses


def test_lookahead_next_use_and_advance():
    la = Lookahead(["a", "b", "a", "c"])
    uses = [la.next_use(k) for k in "abcz"]
    assert uses == [0, 1, 3, INF]
    la.advance("a")
    assert (la.next_use("a"), la.next_use("b"), len(la)) == (1, 0, 3)
    la.advance("z")  # unknown access: unchanged
    assert len(la) == 3
    la.advance("c")  # skips b and a
    assert (la.next_use("a"), la.next_use("b"), len(la)) == (INF, INF, 0)
    la.extend(["b", "b"])
    assert la.next_use("b") == 0
    la.advance("b")
    assert la.next_use("b") == 0
    la.clear()
    assert la.next_use("b") == INF and len(la) == 0
    la.extend(["q"])
    assert la.next_use("q") == 0


def test_policy_interface_direct():
    la = Lookahead([(0, 1), (0, 2)])
    pol = make_policy("belady")
    for key in [(0, 0), (0, 1), (0, 2), (0, 3)]:
        pol.on_insert(key)
    assert pol.victim([(0, 1), (0, 2)], la) == (0, 2)
    assert pol.victim([(0, 0), (0, 1), (0, 3)], la) == (0, 0)
    pol.on_hit((0, 0))
    assert pol.victim([(0, 0), (0, 3)], la) == (0, 3)


def test_unknown_policy_lists_names():
    with pytest.raises(UnknownPolicyError, match="lru, lfu, fifo, belady.*'random'") as info:
        make_policy("random")
    assert isinstance(info.value, EdgeReadmeError)


@settings(max_examples=60, deadline=None)
@given(
    trace=st.lists(st.integers(0, 7), min_size=1, max_size=60),
    capacity=st.integers(1, 5),
    window=st.integers(0, 6),
)
def test_min_is_optimal(trace, capacity, window):
    best = simulate(trace, capacity, "belady").misses
    for name in ("lru", "lfu", "fifo"):
        assert best <= simulate(trace, capacity, name).misses
    assert best <= simulate(trace, capacity, "belady", lookahead=window).misses


def test_min_exhaustive_small_cases():
    # brute force over all eviction choices on short random traces: MIN is the minimum.
    rng = random.Random(0)
    for _ in range(30):
        trace = [rng.randrange(4) for _ in range(9)]
        assert simulate(trace, 2, "belady").misses == _brute_force(trace, 2)


def _brute_force(trace, capacity):
    best = {frozenset(): 0}
    for key in trace:
        nxt = {}
        for cache, misses in best.items():
            if key in cache:
                options = [(cache, misses)]
            elif len(cache) < capacity:
                options = [(cache | {key}, misses + 1)]
            else:
                options = [((cache - {v}) | {key}, misses + 1) for v in cache]
            for state, m in options:
                nxt[state] = min(m, nxt.get(state, m))
        best = nxt
    return min(best.values())
