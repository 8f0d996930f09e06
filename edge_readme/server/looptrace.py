"""Event-loop stall tracing for the servers, off unless EDGE_README_LOOP_TRACE is set.

With `EDGE_README_LOOP_TRACE=SECONDS` (e.g. 0.05) these are reported on stderr when they take
longer than SECONDS: one event-loop callback (with what it ran), one loop turn (with how many
callbacks it ran and their total time), a garbage collection (with its thread: a full
collection runs in whichever thread allocates, event loop included), and the loop waking late
(busy, or its thread waiting for the GIL). It answers "which part holds the event loop" under a
burst; it costs a `perf_counter` pair per callback, so it is for measurement runs.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import threading
import time

ENV = "EDGE_README_LOOP_TRACE"


def threshold() -> float | None:
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    try:
        return max(0.001, float(raw))
    except ValueError:
        print(f"{ENV}={raw!r}: expected seconds, e.g. 0.05; tracing stays off", file=sys.stderr)
        return None


def install() -> None:
    """Wrap `asyncio.Handle._run` to time every callback (process-wide, idempotent)."""
    limit = threshold()
    if limit is None or getattr(asyncio.Handle, "_edge_readme_traced", False):
        return
    run = asyncio.Handle._run
    turn: dict = {"n": 0, "busy": 0.0, "kinds": {}}

    def timed(self) -> None:
        t0 = time.perf_counter()
        run(self)
        dt = time.perf_counter() - t0
        turn["n"] += 1
        turn["busy"] += dt
        kind = _kind(self)
        n, t = turn["kinds"].get(kind, (0, 0.0))
        turn["kinds"][kind] = (n + 1, t + dt)
        if dt > limit:
            print(f"[looptrace] {time.time():.3f} callback {dt * 1e3:.1f} ms: "
                  f"{_describe(self)}", file=sys.stderr, flush=True)

    asyncio.Handle._run = timed  # type: ignore[method-assign]
    once = asyncio.BaseEventLoop._run_once  # type: ignore[attr-defined]

    def timed_turn(self) -> None:
        turn["n"], turn["busy"], turn["kinds"] = 0, 0.0, {}
        t0 = time.perf_counter()
        once(self)
        dt = time.perf_counter() - t0
        if dt > limit:
            top = sorted(turn["kinds"].items(), key=lambda kv: -kv[1][1])[:4]
            what = ", ".join(f"{k} {n}x {t * 1e3:.0f} ms" for k, (n, t) in top)
            print(f"[looptrace] {time.time():.3f} turn {dt * 1e3:.1f} ms: {turn['n']} "
                  f"callbacks took {turn['busy'] * 1e3:.1f} ms ({what})", file=sys.stderr,
                  flush=True)

    asyncio.BaseEventLoop._run_once = timed_turn  # type: ignore[attr-defined]
    asyncio.Handle._edge_readme_traced = True  # type: ignore[attr-defined]
    started: dict[int, float] = {}

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[threading.get_ident()] = time.perf_counter()
            return
        dt = time.perf_counter() - started.pop(threading.get_ident(), time.perf_counter())
        if threading.current_thread() is threading.main_thread():
            n, t = turn["kinds"].get("gc", (0, 0.0))
            turn["kinds"]["gc"] = (n + 1, t + dt)
        if dt > limit:
            print(f"[looptrace] {time.time():.3f} gc generation {info['generation']} "
                  f"{dt * 1e3:.1f} ms in thread {threading.current_thread().name}",
                  file=sys.stderr, flush=True)

    gc.callbacks.append(on_gc)


def _kind(handle: asyncio.Handle) -> str:
    cb = getattr(handle, "_callback", None)
    owner = getattr(cb, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        name, where = getattr(coro, "__qualname__", "task"), ""
        while coro is not None:  # the innermost await: where this step left the task
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
            if frame is not None:
                where = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"
            coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
        return f"{name}@{where}" if where else name
    return getattr(cb, "__qualname__", type(cb).__name__)


def _describe(handle: asyncio.Handle) -> str:
    cb = getattr(handle, "_callback", None)
    owner = getattr(cb, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        frame = getattr(coro, "cr_frame", None)
        where = f" at {frame.f_code.co_filename}:{frame.f_lineno}" if frame else ""
        return f"task {getattr(coro, '__qualname__', coro)}{where}"
    return repr(cb)[:200]


async def monitor(period: float = 0.01) -> None:
    """Report wake-ups later than the threshold (the loop's lag), until cancelled."""
    limit = threshold()
    if limit is None:
        return
    while True:
        t0 = time.perf_counter()
        await asyncio.sleep(period)
        late = time.perf_counter() - t0 - period
        if late > limit:
            print(f"[looptrace] {time.time():.3f} loop lag {late * 1e3:.1f} ms",
                  file=sys.stderr, flush=True)
