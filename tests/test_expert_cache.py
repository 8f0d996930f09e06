import os
import random

import pytest
import torch

from edge_readme.cache import ExpertCache, ExpertStore
from edge_readme.cache.policies import POLICIES
from edge_readme.errors import BudgetError, ExpertFileError
from edge_readme.experts_format import read_manifest
from tests.moe_fixture import write_fixture


def _open(tmp_path, file_dtype=torch.bfloat16, **kwargs):
    _, experts = write_fixture(tmp_path, file_dtype)
    manifest = read_manifest(tmp_path)
    store = ExpertStore(manifest, verify=True)
    return store, manifest, experts


def _check(weights, expected, dtype):
    want = expected.to(dtype)
    rows = want.shape[1]
    assert torch.equal(weights.gate_up[:rows], want[0])
    assert torch.equal(weights.gate_up[rows:], want[1])
    assert torch.equal(weights.down.t(), want[2])


def _in_block(cache, t):
    lo = cache.block.data_ptr()
    hi = lo + cache.block.numel() * cache.block.element_size()
    return lo <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= hi


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("slots", [1, 2, 5])
@pytest.mark.parametrize(
    ("file_dtype", "dtype"), [(torch.bfloat16, torch.float32), (torch.float32, torch.float32)]
)
def test_acquire_is_exact_under_every_policy(tmp_path, policy, slots, file_dtype, dtype):
    store, manifest, experts = _open(tmp_path, file_dtype)
    rng = random.Random(slots)
    trace = [rng.choice(manifest.keys()) for _ in range(60)]
    cache = ExpertCache(store, manifest, slots, "cpu", dtype, policy)
    cache.lookahead.extend(trace)
    ptrs = {cache.block.untyped_storage().data_ptr()}
    for key in trace:
        with cache.get(*key) as w:
            _check(w, experts[key], dtype)
            assert _in_block(cache, w.gate_up) and _in_block(cache, w.down)
        cache.lookahead.advance(key)
        ptrs.add(cache.block.untyped_storage().data_ptr())
    assert len(ptrs) == 1
    s = cache.stats
    assert s.hits + s.misses == len(trace) and s.loads == s.misses
    assert len(cache.resident()) <= slots
    store.close()


def test_stats_hand_worked_lru(tmp_path):
    store, manifest, _ = _open(tmp_path)
    cache = ExpertCache(store, manifest, 2, "cpu", torch.float32, "lru")
    a, b, c = (0, 0), (0, 1), (1, 2)
    for key in [a, b, a, c, b]:  # miss miss hit miss(evict b) miss(evict a)
        with cache.get(*key):
            pass
    s = cache.stats
    assert (s.hits, s.misses, s.loads, s.evictions) == (1, 4, 4, 2)
    assert s.hit_ratio == pytest.approx(0.2)
    length = {k: manifest.entry(*k).length for k in (a, b, c)}
    assert s.bytes_read == 2 * length[b] + length[a] + length[c]
    assert s.prefetch_issued == s.prefetch_hits == s.prefetch_wasted == 0
    assert sorted(cache.resident()) == [b, c]
    rows = {k: manifest.entry(*k).rows for k in (a, b, c)}
    assert s.peak_resident_bytes == 3 * 32 * 4 * max(rows[a] + rows[b], rows[a] + rows[c],
                                                     rows[b] + rows[c])
    assert s.to_json()["hit_ratio"] == pytest.approx(0.2)
    cache.reset_stats()
    assert cache.stats.hits == 0 and cache.stats.peak_resident_bytes > 0


def test_prefetch_stats_and_lookahead_protection(tmp_path):
    store, manifest, experts = _open(tmp_path)
    cache = ExpertCache(store, manifest, 2, "cpu", torch.float32, "belady")
    a, b, c, d = (0, 0), (0, 1), (0, 2), (0, 3)
    assert cache.request([a, b]) == 2 and cache.stats.prefetch_issued == 2
    cache.lookahead.extend([a, b, c])
    assert cache.request([c]) == 0  # both residents are needed before c
    with cache.get(*a) as w:
        _check(w, experts[a], torch.float32)
    assert (cache.stats.prefetch_hits, cache.stats.hits, cache.stats.misses) == (1, 1, 0)
    cache.lookahead.advance(a)
    cache.lookahead.clear()
    assert cache.request([d]) == 1  # nothing known: evicts b, the least recently used
    assert cache.stats.prefetch_wasted == 1  # b was prefetched and never used
    assert sorted(cache.resident()) == [a, d]


def test_pinned_experts_are_never_evicted(tmp_path):
    store, manifest, experts = _open(tmp_path)
    cache = ExpertCache(store, manifest, 2, "cpu", torch.float32, "lru")
    keep = cache.acquire(0, 0)
    for key in manifest.keys()[1:]:
        with cache.get(*key) as w:
            _check(w, experts[key], torch.float32)
        assert (0, 0) in cache.resident()
    _check(keep, experts[(0, 0)], torch.float32)
    other = cache.acquire(1, 1)
    with pytest.raises(BudgetError, match="pinned"):
        cache.acquire(2, 2)
    assert cache.request([(2, 2)]) == 0
    cache.release(1, 1)
    cache.release(0, 0)
    _check(other, experts[(1, 1)], torch.float32)
    with pytest.raises(ValueError, match="not acquired"):
        cache.release(0, 0)


def test_read_error_frees_slot_and_cache_stays_usable(tmp_path):
    store, manifest, experts = _open(tmp_path)
    cache = ExpertCache(store, manifest, 2, "cpu", torch.float32, "lru")
    with cache.get(0, 0):
        pass
    bad = manifest.entry(2, 3)
    with open(manifest.path, "r+b") as f:
        f.seek(bad.offset)
        f.write(b"\xde\xad\xbe\xef")
    with pytest.raises(ExpertFileError, match="layer 2 expert 3"):
        cache.acquire(2, 3)
    assert cache.resident() == [(0, 0)] and len(cache._free) == 1
    with pytest.raises(ExpertFileError):
        cache.request([(2, 3)])
    os.truncate(manifest.path, bad.offset)
    with pytest.raises(ExpertFileError, match="short read"):
        cache.acquire(2, 3)
    for key in [(0, 1), (1, 1), (0, 0)]:
        with cache.get(*key) as w:
            _check(w, experts[key], torch.float32)


def test_preload_all(tmp_path):
    store, manifest, experts = _open(tmp_path)
    cache = ExpertCache(store, manifest, 100, "cpu", torch.float32, "lru")
    assert cache.num_slots == len(experts)
    cache.preload_all()
    loads = cache.stats.loads
    for key in manifest.keys():
        with cache.get(*key) as w:
            _check(w, experts[key], torch.float32)
    assert cache.stats.loads == loads and cache.stats.hits == len(experts)
    small = ExpertCache(store, manifest, 3, "cpu", torch.float32, "lru")
    with pytest.raises(BudgetError, match="12 slots"):
        small.preload_all()


def test_slot_layout_is_preallocated(tmp_path):
    store, manifest, _ = _open(tmp_path, torch.float32)
    cache = ExpertCache(store, manifest, 3, "cpu", torch.float32, "fifo")
    assert cache.slot_bytes % 4096 == 0 and cache.slot_bytes >= 3 * 24 * 32 * 4
    assert cache.block.shape == (3, cache.slot_bytes // 4)
    assert cache.block.data_ptr() % 4096 == 0
    w = cache.acquire(1, 1)
    assert w.gate_up.untyped_storage().data_ptr() == cache.block.untyped_storage().data_ptr()
    cache.release(1, 1)
    with pytest.raises(BudgetError, match="at least 1"):
        ExpertCache(store, manifest, 0, "cpu", torch.float32, "lru")
