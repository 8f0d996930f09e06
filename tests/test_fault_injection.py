"""Faults in the expert path: a slow read, EIO from the device, the prefetch thread dying, an
exception while an expert is pinned. Each time the request fails with a typed error (or waits and
answers), no slot stays pinned or leaks, memory stays within the budget, and the next request
answers with the exact tokens.

Faults are injected at the boundary with the OS (the store's positioned read) and at the
compute step inside `cache.get` (the model's expert FFN); everything else runs for real.
"""

from __future__ import annotations

import errno
import threading
import time

import pytest

from edge_readme import Engine, ExpertFileError
from edge_readme import model as model_module
from edge_readme.runtime import dry_run_plan
from tests.tiny_models import write_moe

PROMPTS = ["the theory of heat", " a tiny test, then another one", "on and on"]


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return write_moe(tmp_path_factory.mktemp("moe") / "tiny-moe", num_experts=4, layers=3)


@pytest.fixture(scope="module")
def reference(moe):
    with Engine.load(str(moe), device="cpu", context_length=128) as e:  # all resident
        return [e.generate(p, max_tokens=10).token_ids for p in PROMPTS]


@pytest.fixture()
def engine(moe):
    plan = dry_run_plan(str(moe), {"device": "cpu", "context_length": 128})
    with Engine.load(str(moe), device="cpu", context_length=128,
                     memory_budget=plan["minimum_bytes"] + plan["slot_bytes"]) as e:
        yield e


class FaultyReads:
    """Replaces one store's positioned read: `eio` failures, then `slow` seconds per read."""

    def __init__(self, store):
        self.store, self.real = store, store._pread
        self.eio, self.slow, self.calls = 0, 0.0, 0
        self.only_thread: str | None = None  # fail reads made by this thread only
        store._pread = self

    def __call__(self, entry, out):
        self.calls += 1
        mine = self.only_thread in (None, threading.current_thread().name)
        if self.eio and mine:
            self.eio -= 1
            raise OSError(errno.EIO, "Input/output error")
        if self.slow:
            time.sleep(self.slow)
        return self.real(entry, out)


def assert_clean(e: Engine) -> None:
    cache = e.runtime.cache
    assert e.runtime.prefetcher.wait_idle(timeout=10)  # a prefetch may still be in flight
    assert cache._pins == {} and not cache._loading
    assert len(cache._free) + len(cache._key_slot) == cache.num_slots  # no slot leaked
    assert e.runtime.resident_bytes() <= e.runtime.plan.budget_bytes


def assert_exact(e: Engine, reference) -> None:
    got = []
    for p in PROMPTS:
        e.reset()  # a fresh prefix: see test_same_prompt_twice_keeps_its_tokens below
        got.append(e.generate(p, max_tokens=10).token_ids)
    assert got == reference


def test_same_prompt_twice_keeps_its_tokens(moe):
    """Found by the fault tests: a prompt repeated after a 10-token answer reuses its prefix and
    decodes its last token alone; that path reads the KV cache as the prompt's path does."""
    with Engine.load(str(moe), device="cpu", context_length=128) as e:
        first = e.generate(PROMPTS[0], max_tokens=10).token_ids
        assert e.generate(PROMPTS[0], max_tokens=10).token_ids == first


def test_eio_fails_the_request_with_a_typed_error(engine, reference):
    faults = FaultyReads(engine.runtime.cache.store)
    faults.eio = 10**6  # the device fails every read: prefetches and on-demand loads alike
    with pytest.raises(ExpertFileError, match=r"layer \d+ expert \d+: read failed.*Input/output"):
        for p in PROMPTS:
            engine.generate(p, max_tokens=10)
    faults.eio = 0
    assert_clean(engine)
    assert_exact(engine, reference)
    assert_clean(engine)


def test_one_eio_in_a_prefetch_is_retried_on_demand(engine, reference):
    faults = FaultyReads(engine.runtime.cache.store)
    faults.eio, faults.only_thread = 1, "edge-readme-prefetch"
    before = engine.runtime.prefetcher.failures
    assert_exact(engine, reference)
    assert faults.eio == 0 and engine.runtime.prefetcher.failures == before + 1
    assert_clean(engine)


def test_slow_reads_wait_and_answer_exactly(engine, reference):
    faults = FaultyReads(engine.runtime.cache.store)
    faults.slow = 0.2
    assert engine.generate(PROMPTS[0], max_tokens=10).token_ids == reference[0]
    assert faults.calls > 0
    faults.slow = 0
    assert_clean(engine)
    assert_exact(engine, reference)


def test_cancel_during_a_slow_read(engine, reference):
    faults = FaultyReads(engine.runtime.cache.store)
    faults.slow = 1.5
    stream = engine.stream(PROMPTS[1], max_tokens=50)
    threading.Timer(0.3, stream.cancel).start()
    t0 = time.monotonic()
    result = stream.collect()
    assert result.finish_reason == "cancelled"
    assert time.monotonic() - t0 < 20  # within the reads already started, not all 50 tokens
    faults.slow = 0
    assert_clean(engine)
    assert_exact(engine, reference)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # injected
def test_prefetch_thread_dying_leaves_loads_on_demand(engine, reference):
    pre, cache = engine.runtime.prefetcher, engine.runtime.cache

    def die(keys):
        raise SystemExit("injected: the prefetch thread dies")

    cache.request = die  # only the prefetch thread calls request(); acquire() loads itself
    assert_exact(engine, reference)
    assert pre.failures >= 1 and isinstance(pre.last_error, SystemExit)
    deadline = time.monotonic() + 5
    while pre._thread is not None and pre._thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pre.wait_idle(timeout=1)  # a dead thread does not hang waiters
    assert pre.submit([(0, 0), (1, 1)]) == 0 and pre.pending == 0  # nor queue up forever
    assert_clean(engine)
    assert_exact(engine, reference)


def test_exception_while_an_expert_is_pinned(engine, reference, monkeypatch):
    real, calls = model_module.expert_ffn, []

    def fails_once(x, w):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("injected fault inside cache.get")
        return real(x, w)

    monkeypatch.setattr(model_module, "expert_ffn", fails_once)
    with pytest.raises(RuntimeError, match="injected"):
        for p in PROMPTS:
            engine.generate(p, max_tokens=10)
    assert_clean(engine)
    assert_exact(engine, reference)
    assert_clean(engine)
