"""Pacing a burst of completion requests through the event loop, so GET /health is not queued
behind it.

asyncio runs, in each turn, every callback made ready in the turn before: when 1,000 users'
requests arrive together, their 1,000 handlers (framework, body, routing, the 429 or the
admission: about 1 ms each on a busy 2-core machine) ran in one turn, and a /health request
read in that turn waited for all of them (measured: one turn of 556 handlers took 0.58 s).
`Paced` first reads a completion request's body (clients often send it after the headers, and
handlers that waited for their bodies woke together when the bodies came in), then lets at most
`per_turn` requests into the app per loop turn; the others wait their turn in arrival order.
Every other path (/health, /v1/models) goes straight through, so it waits for at most one
turn's worth of handlers. Throughput is unchanged: the same work, in slices.
"""

from __future__ import annotations

import asyncio
from collections import deque

PACED_PATHS = ("/v1/chat/completions", "/v1/completions")
PER_TURN = 32
BUFFER = 1 << 20  # body bytes read before the gate; past that, the app reads on (and refuses)


class Paced:
    """An ASGI wrapper: completion requests enter `app` at most `per_turn` per loop turn."""

    def __init__(self, app, per_turn: int = PER_TURN, paths: tuple[str, ...] = PACED_PATHS,
                 buffer: int = BUFFER):
        if per_turn < 1:
            raise ValueError(f"per_turn: expected an integer >= 1, got {per_turn!r}")
        self.app, self.per_turn, self.paths, self.buffer = app, per_turn, paths, buffer
        self.waiting: deque[asyncio.Future] = deque()
        self.used = 0  # entries granted in the current turn
        self.ticking = False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        early, size = [], 0
        while size <= self.buffer:
            msg = await receive()
            early.append(msg)
            if msg["type"] != "http.request" or not msg.get("more_body"):
                break
            size += len(msg.get("body", b""))
        await self.enter()

        async def replay():
            return early.pop(0) if early else await receive()

        await self.app(scope, replay, send)

    async def enter(self) -> None:
        loop = asyncio.get_running_loop()
        self._tick(loop)
        if not self.waiting and self.used < self.per_turn:
            self.used += 1
            return
        fut = loop.create_future()
        self.waiting.append(fut)
        await fut  # cancelled with its request: the next turn skips it

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.ticking:
            self.ticking = True
            loop.call_soon(self._next_turn, loop)  # runs in the next turn

    def _next_turn(self, loop: asyncio.AbstractEventLoop) -> None:
        self.ticking, self.used = False, 0
        while self.waiting and self.used < self.per_turn:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_result(None)
                self.used += 1
        if self.waiting or self.used:
            self._tick(loop)
