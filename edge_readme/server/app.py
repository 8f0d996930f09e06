"""A local OpenAI-compatible HTTP server over one `Engine` (Starlette + uvicorn, `serve` extra).

Endpoints: POST /v1/chat/completions and /v1/completions (SSE with `stream: true`), GET /v1/models
and GET /health (load progress; 503 until the model is ready). Engine calls block, so each request
is pumped from its own thread into the event loop; a client that disconnects cancels its request.
This module knows HTTP and the wire format, not tokens, caches or budgets.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import socket
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from ..engine import Chunk, Engine, Stream
from ..errors import EdgeReadmeError, QueueFullError, RequestError
from . import protocol as P
from .protocol import APIError, Limits

INSTALL_HINT = "pip install 'edge-readme[serve]'"


class ServeExtraMissing(EdgeReadmeError, ImportError):
    """Starlette or uvicorn is not installed."""


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ServeExtraMissing(f"the server needs {module.split('.')[0]}, which is not "
                                f"installed; run: {INSTALL_HINT}") from None


def default_model_name(model: str | Path) -> str:
    """The name clients use: a registry name as is, a file or folder by its stem."""
    s, p = str(model), Path(str(model))
    if p.suffix == ".gguf":
        return p.stem
    return p.name if (os.sep in s or p.exists()) else s


class EngineHolder:
    """The engine, or its load in progress: /health reports the stage; completions wait."""

    def __init__(self, engine: Engine | None = None):
        self.engine = engine
        self.stage, self.fraction = ("ready", 1.0) if engine else ("starting", 0.0)
        self.error: BaseException | None = None
        self.served = {"requests": 0, "stop": 0, "length": 0, "cancelled": 0, "error": 0}
        self.inflight = 0  # requests queued or running on the engine now
        self._lock = threading.Lock()
        self._admit: tuple[Any, asyncio.Lock] | None = None

    def start_loading(self, load: Callable[[Callable[[str, float], None]], Engine],
                      on_failure: Callable[[], None] = lambda: None,
                      on_ready: Callable[[], None] = lambda: None) -> "EngineHolder":
        """Run `load(on_progress)` in a daemon thread; the holder reports its progress and
        calls `on_ready()` once the engine is in place."""

        def progress(stage: str, frac: float) -> None:
            self.stage, self.fraction = stage, float(frac)

        def run() -> None:
            try:
                self.engine = load(progress)
                self.stage, self.fraction = "ready", 1.0
            except BaseException as e:  # reported on /health and re-raised by serve_loading
                self.error, self.stage = e, "failed"
                on_failure()
                return
            on_ready()

        threading.Thread(target=run, name="edge-readme-load", daemon=True).start()
        return self

    def ready(self) -> Engine:
        if self.engine is not None:
            return self.engine
        if self.error is not None:
            raise APIError(503, f"the model failed to load: {self.error}", code="model_failed",
                           type="server_error")
        raise APIError(503, f"the model is loading ({self.stage} {self.fraction:.0%}); "
                            "retry when GET /health says ready", code="model_loading",
                       type="server_error")

    def admission(self) -> asyncio.Lock:
        """One request at a time is tokenized and queued (in a worker thread): the next one's
        room check on the event loop then sees it, so under a burst the requests past the
        queue's room are answered 429 on the loop, not after a trip to a worker thread."""
        loop = asyncio.get_running_loop()
        if self._admit is None or self._admit[0] is not loop:
            self._admit = (loop, asyncio.Lock())
        return self._admit[1]

    def started(self) -> None:
        with self._lock:
            self.inflight += 1

    def finished(self, reason: str) -> None:
        with self._lock:
            self.inflight = max(0, self.inflight - 1)
            self.served["requests"] += 1
            self.served[reason] = self.served.get(reason, 0) + 1


def create_app(engine: Engine | EngineHolder, api_key: str | None = None,
               limits: Limits = Limits(), model_name: str | None = None):
    """The ASGI app. Pass an `EngineHolder` that is loading to answer /health meanwhile."""
    from starlette.responses import JSONResponse

    holder = engine if isinstance(engine, EngineHolder) else EngineHolder(engine)
    if model_name is None:
        model_name = default_model_name(holder.engine.name) if holder.engine else "model"
    app, authorize = base_app(api_key)
    app.state.holder, app.state.limits = holder, limits

    def names() -> set[str]:
        e = holder.engine
        return {model_name} | ({e.name, default_model_name(e.name)} if e else set())

    async def health(request):
        e = holder.engine
        body = {"status": "ok" if e else "failed" if holder.error else "loading",
                "model": model_name,
                "progress": {"stage": holder.stage, "fraction": round(holder.fraction, 4)},
                "served": dict(holder.served)}
        if holder.error is not None:
            body["error"] = str(holder.error)
        return JSONResponse(body, status_code=200 if e else 503)

    async def models(request):
        authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": 0, "owned_by": "edge-readme"}]})

    async def complete(request):
        chat = request.scope["path"].endswith("/chat/completions")
        authorize(request)
        body = await _read_body(request, limits.max_body_bytes)
        full = refuse_when_full([holder.engine])
        if full is not None:
            return full
        body = P.parse_json(body)
        eng = holder.ready()
        model = P.model_field(body, names(), model_name)
        return await respond(request, body, chat, eng, holder, model, limits)

    # Plain Starlette routes: handlers take the request and return responses, no schema magic.
    app.add_route("/health", health, methods=["GET"])
    app.add_route("/v1/models", models, methods=["GET"])
    app.add_route("/v1/chat/completions", complete, methods=["POST"])
    app.add_route("/v1/completions", complete, methods=["POST"])
    return app


def refuse_when_full(engines: list[Engine | None], headers: dict[str, str] | None = None):
    """The 429 answer when every engine's queue is full (None while one has room or is still
    loading): under a burst most requests end here, before their body is parsed or routed."""
    from starlette.responses import JSONResponse

    errors = []
    for e in engines:
        if e is None:
            return None
        try:
            e.check_room()
            return None
        except QueueFullError as err:
            errors.append(err)
    if not errors:
        return None
    soonest = min(errors, key=lambda err: err.retry_after)
    err = APIError(429, str(soonest) if len(errors) == 1 else
                   f"every model's queue is full; {soonest}", code="queue_full",
                   type="server_error")
    return JSONResponse(err.body(), status_code=429,
                        headers={"Retry-After": str(soonest.retry_after), **(headers or {})})


def base_app(api_key: str | None):
    """A Starlette app with the OpenAI-style error handlers, and the API-key check its routes
    call: (app, authorize). Both servers (one model, and routed) start from it. Plain
    Starlette, not FastAPI: the routes use no schema, and FastAPI's middleware layers cost
    event-loop time on every request (a 1,000-user burst is 1,000 passes through them)."""
    starlette = _require("starlette.applications")
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse

    key_bytes = check_api_key(api_key).encode() if api_key is not None else b""
    app = starlette.Starlette()

    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    async def http_error(request, exc: HTTPException):
        err = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                       code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)

    async def crash(request, exc: Exception):
        err = APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    def authorize(request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare bytes: a header that is not ASCII (or a key that is not) must not raise
        token_bytes = token.strip().encode("utf-8", "surrogateescape")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token_bytes, key_bytes):
            raise APIError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, crash)
    return app, authorize


def check_api_key(key: str) -> str:
    """An API key must be printable ASCII (it travels in an HTTP header); else EdgeReadmeError."""
    if not key or not all(33 <= ord(ch) <= 126 for ch in key):
        raise EdgeReadmeError("--api-key: expected printable ASCII characters without spaces "
                              f"({len(key)} characters given, some outside that range); "
                              "choose another key")
    return key


async def respond(request, body: dict, chat: bool, eng: Engine, holder: EngineHolder,
                  model: str, limits: Limits, headers: dict[str, str] | None = None,
                  extra_stats: dict | None = None):
    """Run one checked completion request on `eng` and answer it (JSON or SSE). `headers` go on
    the response; `extra_stats` join the body's stats (the routed server's choice)."""
    from starlette.responses import JSONResponse

    kw = P.sampling(body, limits)
    stream_it, include_usage = P.streaming(body)
    raw = P.messages(body) if chat else P.prompt(body)
    chunks: asyncio.Queue = asyncio.Queue()
    feed = _Feed(asyncio.get_running_loop(), chunks, holder)
    try:
        eng.check_room()  # a full queue answers 429 here, without a trip to a worker thread
        async with holder.admission():
            eng.check_room()  # and again once the requests admitted before this one queued
            stream, n_prompt = await asyncio.to_thread(_start, eng, raw, chat, kw, limits, feed)
    except RequestError as e:
        raise P.bad(str(e), "messages" if chat else "prompt") from None
    except QueueFullError as e:  # bounded queue: tell the client when to come back
        err = APIError(429, str(e), code="queue_full", type="server_error")
        return JSONResponse(err.body(), status_code=429,
                            headers={"Retry-After": str(e.retry_after), **(headers or {})})
    rid = P.new_id("chatcmpl" if chat else "cmpl")
    deadline = _Deadline(stream, limits.request_timeout)
    events = _events(chunks)
    if stream_it:
        return _EventStream(_sse(events, rid, model, chat, include_usage, n_prompt), stream,
                            headers)
    watcher = asyncio.ensure_future(_cancel_on_disconnect(request.receive, stream))
    try:
        text, last = [], None
        async for c in events:
            text.append(c.text)
            last = c
    except APIError:
        deadline.check()
        raise
    finally:
        watcher.cancel()
        deadline.cancel()
        stream.cancel()
    deadline.check()
    assert last is not None and last.finish_reason is not None
    stats = {**(last.stats or {}), **(extra_stats or {})}
    use = P.usage(n_prompt, stats.get("completion_tokens", 0))
    make = P.chat_body if chat else P.completion_body
    return JSONResponse(make(rid, model, "".join(text), last.finish_reason, use, stats),
                        headers=headers)


class _Deadline:
    """--request-timeout: cancels the stream when the time is up; `check()` then answers 504."""

    def __init__(self, stream: Stream, seconds: float | None):
        self.seconds, self.fired, self._timer = seconds, False, None
        if seconds:
            self._timer = asyncio.get_running_loop().call_later(seconds, self._fire, stream)

    def _fire(self, stream: Stream) -> None:
        self.fired = True
        stream.cancel()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def check(self) -> None:
        if self.fired:
            raise APIError(504, f"the request ran past this server's {self.seconds:g} s limit "
                                "and was cancelled (--request-timeout); ask for fewer tokens",
                           code="request_timeout", type="server_error")


async def _read_body(request, limit: int) -> bytes:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise APIError(413, f"the request body is {size} bytes; this server takes at most "
                            f"{limit} (--max-body-bytes)", code="request_too_large")
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > limit:
            raise APIError(413, f"the request body is over {limit} bytes (--max-body-bytes)",
                           code="request_too_large")
    return bytes(data)


def _start(engine: Engine, raw: Any, chat: bool, kw: dict, limits: Limits,
           feed: "_Feed") -> tuple[Stream, int]:
    """Tokenize, check the prompt limit, queue the request and start the thread that feeds its
    chunks to the event loop (runs in a worker thread: under a burst, starting a thread waits
    for the GIL twice, and that wait must not hold the event loop)."""
    engine.check_room()  # a full queue answers 429 before the template and the tokenizer run
    text = engine.chat_prompt(raw) if chat else raw
    ids = engine.tokenizer.encode(text) if isinstance(text, str) else list(text)
    limit = limits.max_prompt_tokens or engine.runtime.context_length - 1
    if len(ids) > limit:
        raise APIError(400, f"the prompt is {len(ids)} tokens; this server takes at most {limit} "
                            "(--max-prompt-tokens / --context-length)",
                       "messages" if chat else "prompt", "context_length_exceeded")
    stream = engine.stream(ids, **kw)
    feed.start(stream)
    return stream, len(ids)


class _Feed:
    """Reads one stream's chunks on a thread of its own into an asyncio queue, so the event
    loop never blocks on the engine; counts the request in the holder while it runs."""

    def __init__(self, loop: asyncio.AbstractEventLoop, q: asyncio.Queue, holder: EngineHolder):
        self.loop, self.q, self.holder = loop, q, holder

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.q.put_nowait, item)
        except RuntimeError:  # the loop is gone (server shutting down); the engine finishes
            pass

    def start(self, stream: Stream) -> None:
        def run() -> None:
            try:
                for chunk in stream:
                    self.put(chunk)
            except BaseException as e:
                self.put(e)
            self.holder.finished(stream.result.finish_reason if stream.result else "error")

        self.holder.started()
        threading.Thread(target=run, name="edge-readme-pump", daemon=True).start()


async def _events(q: asyncio.Queue) -> AsyncIterator[Chunk]:
    """The chunks a `_Feed` delivers, until the last one (or its error)."""
    while True:
        item = await q.get()
        if isinstance(item, EdgeReadmeError):
            raise P.bad(str(item))
        if isinstance(item, BaseException):
            raise item
        yield item
        if item.finish_reason is not None:
            return


async def _sse(events: AsyncIterator[Chunk], rid: str, model: str, chat: bool,
               include_usage: bool, n_prompt: int) -> AsyncIterator[bytes]:
    if chat:
        yield P.sse(P.chat_chunk(rid, model, {"role": "assistant", "content": ""}))
    try:
        async for c in events:
            if c.text:
                yield P.sse(P.chat_chunk(rid, model, {"content": c.text}) if chat
                            else P.completion_chunk(rid, model, c.text))
            if c.finish_reason is None:
                continue
            yield P.sse(P.chat_chunk(rid, model, {}, c.finish_reason) if chat
                        else P.completion_chunk(rid, model, "", c.finish_reason))
            if include_usage:
                use = P.usage(n_prompt, (c.stats or {}).get("completion_tokens", 0))
                yield P.sse(P.chat_chunk(rid, model, None, use=use) if chat
                            else P.completion_chunk(rid, model, None, use=use))
    except APIError as e:  # the status line is already sent: report in the stream
        yield P.sse(e.body())
    yield P.sse("[DONE]")


async def _cancel_on_disconnect(receive, stream: Stream) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    stream.cancel()


class _EventStream:
    """An SSE response over a running engine stream; a client disconnect cancels the stream.

    Written against the bare ASGI interface so the cancel does not depend on how a given
    Starlette version notices disconnects."""

    def __init__(self, events: AsyncIterator[bytes], stream: Stream,
                 headers: dict[str, str] | None = None):
        self.events, self.stream = events, stream
        self.extra = [(k.lower().encode("latin-1"), v.encode("latin-1"))
                      for k, v in (headers or {}).items()]

    async def __call__(self, scope, receive, send) -> None:
        watcher = asyncio.ensure_future(_cancel_on_disconnect(receive, self.stream))
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"),
                   (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"), *self.extra]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            async for data in self.events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away while we wrote
            pass
        finally:
            watcher.cancel()
            self.stream.cancel()
            await self.events.aclose()


# ---------------------------------------------------------------- running


def settle_heap() -> None:
    """Once the models are loaded: collect, then move every object alive now (weights'
    wrappers, tokenizer tables, ~300k objects for two models) out of the garbage collector's
    reach. A full collection otherwise walks them all, holding the GIL for ~0.2 s here, and a
    burst of new connections triggers one, in the event loop or in any thread."""
    import gc

    gc.collect()
    gc.freeze()


def check_port(host: str, port: int) -> None:
    """Fail early, with a one-line reason, when the address cannot be bound."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise EdgeReadmeError(f"--host {host} --port {port}: cannot listen there "
                                  f"({e.strerror}); pick another --port") from None


HEADER_TIMEOUT = 10.0  # seconds a new connection may take to send its request headers
ACCEPT_BATCH = 64  # connections accepted per event-loop turn (asyncio takes its backlog)
LISTEN_BACKLOG = 2048  # connections the kernel holds for us meanwhile
KEEP_ALIVE_TIMEOUT = 5.0  # seconds an idle keep-alive connection stays open


def _guarded_protocol(header_timeout: float):
    """uvicorn's h11 protocol, closing a connection that sends no request within the timeout
    (uvicorn only times out idle keep-alive connections, not fresh silent ones)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Guarded(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_timer = self.loop.call_later(header_timeout, self._no_request)

        def _no_request(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc) -> None:
            self._header_timer.cancel()
            super().connection_lost(exc)

    return Guarded


def _raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard one: many idle sockets must not starve real requests
    (the header timeout closes them; this gives room until it does)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass


def _server(app, host: str, port: int, log_level: str,
            header_timeout: float = HEADER_TIMEOUT):
    uvicorn = _require("uvicorn")
    _raise_fd_limit()
    # asyncio accepts up to `backlog` connections in one callback: a burst of 1,000 users was
    # accepted in one go while GET /health waited behind it for over a second. So the loop
    # takes ACCEPT_BATCH per turn, and the kernel queue is raised back once listening.
    # Completion requests enter the app a batch per turn too (pacing.Paced), so /health is
    # answered after one turn's handlers, not after a whole burst's.
    from . import looptrace
    from .pacing import Paced

    config = uvicorn.Config(Paced(app), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=2, timeout_keep_alive=KEEP_ALIVE_TIMEOUT,
                            http=_guarded_protocol(header_timeout), backlog=ACCEPT_BATCH)

    looptrace.install()  # EDGE_README_LOOP_TRACE=SECONDS: report event-loop stalls

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            for srv in self.servers:
                for sock in srv.sockets:
                    with sock.dup() as same:  # the same listening socket: its queue grows
                        same.listen(LISTEN_BACKLOG)
            self._lag_monitor = asyncio.ensure_future(looptrace.monitor())

    return Server(config)


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: Limits = Limits(), model_name: str | None = None,
          log_level: str = "info") -> None:
    """Serve a loaded engine until Ctrl-C. The caller keeps ownership of the engine."""
    check_port(host, port)
    app = create_app(engine, api_key, limits, model_name)
    settle_heap()
    _server(app, host, port, log_level).run()


def serve_loading(load: Callable[[Callable[[str, float], None]], Engine], model_name: str,
                  host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                  limits: Limits = Limits(), log_level: str = "info") -> None:
    """Listen at once and load with `load(on_progress)` in a thread; /health shows progress.

    A failed load stops the server and its error is raised here; the engine is closed on exit."""
    check_port(host, port)
    holder = EngineHolder()
    server = _server(create_app(holder, api_key, limits, model_name), host, port, log_level)
    holder.start_loading(load, on_failure=lambda: setattr(server, "should_exit", True),
                         on_ready=settle_heap)
    try:
        server.run()
    finally:
        if holder.engine is not None:
            holder.engine.close()
    if holder.error is not None:
        raise holder.error
