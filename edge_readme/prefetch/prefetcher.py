"""Prefetcher: one background I/O thread that loads submitted experts into the cache, in order.

It decides nothing about eviction (ExpertCache.request does) and knows nothing about the router;
the engine submits the keys it expects next. On CUDA the cache's copy stream and per-slot events
make compute wait only on the expert it needs. `enabled=False` gives the on-demand baseline:
no thread, submit() is a no-op, every miss is loaded by acquire() itself.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable

from edge_readme.cache.expert_cache import ExpertCache

Key = tuple[int, int]


class Prefetcher:
    """Serves submitted loads in FIFO order on a daemon thread. Close it (or use `with`)."""

    def __init__(self, cache: ExpertCache, *, enabled: bool = True):
        self.cache = cache
        self.enabled = enabled
        self.failures = 0  # loads that raised; acquire() retries them on demand
        self.last_error: BaseException | None = None
        self._cond = threading.Condition()
        self._queue: deque[Key] = deque()
        self._queued: set[Key] = set()
        self._active: Key | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        if enabled:
            thread = threading.Thread(target=self._run, name="edge-readme-prefetch", daemon=True)
            thread.start()
            self._thread = thread  # only a started thread is ever joined

    def submit(self, keys: Iterable[Key]) -> int:
        """Queue loads in the given order, skipping resident, in-flight and queued keys."""
        if self._thread is None:
            return 0
        added = 0
        with self._cond:
            if self._closed:
                return 0
            for key in keys:
                if key in self._queued or key == self._active or self.cache.contains(key):
                    continue
                self._queue.append(key)
                self._queued.add(key)
                added += 1
            if added:
                self._cond.notify_all()
        return added

    def cancel_pending(self) -> int:
        """Drop queued loads that have not started; return how many were dropped."""
        with self._cond:
            dropped = len(self._queue)
            self._queue.clear()
            self._queued.clear()
            self._cond.notify_all()
            return dropped

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until the queue is empty and no load is running; False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not self._queue and self._active is None, timeout=timeout
            )

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def _next(self) -> Key | None:
        with self._cond:
            self._active = None
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._queue or self._closed)
            if self._closed:
                return None
            key = self._queue.popleft()
            self._queued.discard(key)
            self._active = key
            return key

    def _run(self) -> None:
        try:
            while (key := self._next()) is not None:
                try:
                    self.cache.request([key])
                except Exception as exc:  # noqa: BLE001 - a dead thread would hang wait_idle()
                    with self._cond:
                        self.failures += 1
                        self.last_error = exc
        except BaseException as exc:  # the thread dies: later loads happen on demand
            with self._cond:
                self.failures += 1
                self.last_error = exc
            raise
        finally:  # never leave waiters on a dead thread, nor a queue that no one drains
            with self._cond:
                self._closed = True
                self._active = None
                self._queue.clear()
                self._queued.clear()
                self._cond.notify_all()

    def close(self) -> None:
        """Drop pending loads, let the running one finish, join the thread. Idempotent."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._queued.clear()
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
