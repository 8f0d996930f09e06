import random
import threading
import time

import pytest
import torch

from edge_readme.cache import ExpertCache, ExpertStore
from edge_readme.experts_format import read_manifest
from edge_readme.prefetch import Prefetcher
from tests.moe_fixture import write_fixture


class RecordingStore(ExpertStore):
    """Records read order; reads of `gated` keys block until `gate` is set."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.order, self.gated = [], set()
        self.gate, self.started = threading.Event(), threading.Event()

    def read_into(self, layer, expert, out):
        if (layer, expert) in self.gated:
            self.started.set()
            assert self.gate.wait(10)
        self.order.append((layer, expert))
        return super().read_into(layer, expert, out)


@pytest.fixture
def setup(tmp_path):
    _, experts = write_fixture(tmp_path, torch.bfloat16)
    manifest = read_manifest(tmp_path)
    store = RecordingStore(manifest, verify=True)
    yield store, manifest, experts
    store.close()


def _check(weights, expected):
    assert torch.equal(weights.gate_up[: expected.shape[1]], expected[0].float())
    assert torch.equal(weights.down.t(), expected[2].float())


def test_loads_in_submitted_order(setup):
    store, manifest, experts = setup
    cache = ExpertCache(store, manifest, 12, "cpu", torch.float32, "lru")
    order = [(2, 1), (0, 3), (1, 0), (0, 0), (2, 2)]
    with Prefetcher(cache) as pf:
        assert pf.submit(order) == 5
        assert pf.submit([(2, 1), (0, 3)]) == 0  # queued, in flight or resident
        assert pf.wait_idle(10)
    assert store.order == order
    assert cache.stats.prefetch_issued == 5 and cache.stats.loads == 5
    for key in order:
        with cache.get(*key) as w:
            _check(w, experts[key])
    assert cache.stats.prefetch_hits == 5 and cache.stats.misses == 0


def test_acquire_waits_for_in_flight_load(setup):
    store, manifest, experts = setup
    cache = ExpertCache(store, manifest, 4, "cpu", torch.float32, "lru")
    key = (1, 2)
    store.gated.add(key)
    got = {}
    with Prefetcher(cache) as pf:
        pf.submit([key])
        assert store.started.wait(10)
        thread = threading.Thread(target=lambda: got.update(w=cache.acquire(*key)))
        thread.start()
        time.sleep(0.1)
        assert "w" not in got  # blocked on the in-flight load, not loading it again
        store.gate.set()
        thread.join(10)
        _check(got["w"], experts[key])
        cache.release(*key)
    s = cache.stats
    assert (s.loads, s.misses, s.hits, s.inflight_waits, s.prefetch_hits) == (1, 0, 1, 1, 1)
    assert s.stall_seconds > 0.05
    assert store.order == [key]


def test_cancel_pending_and_on_demand_fallback(setup):
    store, manifest, experts = setup
    cache = ExpertCache(store, manifest, 4, "cpu", torch.float32, "lru")
    store.gated.add((0, 0))
    with Prefetcher(cache) as pf:
        pf.submit([(0, 0), (0, 1), (0, 2)])
        assert store.started.wait(10)
        assert pf.cancel_pending() == 2
        store.gate.set()
        assert pf.wait_idle(10)
    assert store.order == [(0, 0)]
    with cache.get(0, 1) as w:  # not prefetched: loaded on demand
        _check(w, experts[(0, 1)])
    assert cache.stats.misses == 1


def test_disabled_prefetcher_is_on_demand(setup):
    store, manifest, experts = setup
    cache = ExpertCache(store, manifest, 2, "cpu", torch.float32, "lru")
    pf = Prefetcher(cache, enabled=False)
    assert pf.submit([(0, 0)]) == 0 and pf.wait_idle(0)
    with cache.get(0, 0) as w:
        _check(w, experts[(0, 0)])
    assert cache.stats.misses == 1 and store.order == [(0, 0)]
    pf.close()
    pf.close()


def test_prefetch_failure_is_recorded_and_acquire_reports_it(setup):
    store, manifest, experts = setup
    cache = ExpertCache(store, manifest, 4, "cpu", torch.float32, "lru")
    bad = manifest.entry(0, 2)
    with open(manifest.path, "r+b") as f:
        f.seek(bad.offset)
        f.write(b"\x00" * 16)
    with Prefetcher(cache) as pf:
        pf.submit([(0, 2), (0, 1)])
        assert pf.wait_idle(10)
        assert pf.failures == 1 and "layer 0 expert 2" in str(pf.last_error)
    with cache.get(0, 1) as w:
        _check(w, experts[(0, 1)])
    assert cache.stats.prefetch_hits == 1
    assert pf.submit([(1, 1)]) == 0  # closed


def test_prefetch_overlaps_compute_many_steps(setup):
    store, manifest, experts = setup
    cache = ExpertCache(store, manifest, 3, "cpu", torch.float32, "belady")
    path = [(layer, e % 4) for e in range(6) for layer in range(3)]
    cache.lookahead.extend(path)
    with Prefetcher(cache) as pf:
        for i, key in enumerate(path):
            pf.submit(path[i + 1:i + 3])
            with cache.get(*key) as w:
                _check(w, experts[key])
            cache.lookahead.advance(key)
    s = cache.stats
    assert s.hits + s.misses == len(path)


@pytest.mark.parametrize("slots", [1, 2])
@pytest.mark.parametrize("policy", ["lru", "belady"])
def test_small_caches_with_prefetch_stay_exact(setup, slots, policy):
    store, manifest, experts = setup
    cache = ExpertCache(store, manifest, slots, "cpu", torch.float32, policy)
    rng = random.Random(slots)
    trace = [rng.choice(manifest.keys()) for _ in range(40)]
    cache.lookahead.extend(trace)
    with Prefetcher(cache) as pf:
        for i, key in enumerate(trace):
            pf.submit(trace[i + 1:i + 4])
            with cache.get(*key) as w:
                _check(w, experts[key])
            cache.lookahead.advance(key)
    assert cache.stats.hits + cache.stats.misses == len(trace)
