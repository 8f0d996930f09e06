"""GET /health under a burst: what keeps the event loop free for it. Order, not timing: each
test sets up the state a burst creates (a handler stuck in the engine, every queue full, a
kernel queue full of new connections) and checks what the server does, with generous timeouts
only as a guard against hanging."""

from __future__ import annotations

import contextlib
import gc
import socket
import struct
import sys
import threading
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from edge_readme import Engine  # noqa: E402
from edge_readme.routing import build, spec_from  # noqa: E402
from edge_readme.server import EngineHolder, Limits, create_app  # noqa: E402
from edge_readme.server.app import _server, settle_heap  # noqa: E402
from edge_readme.server.routed import Fleet, create_routed_app, load_fleet  # noqa: E402
from tests.serving_util import background  # noqa: E402
from tests.test_routed_server import tiny_moe  # noqa: E402
from tests.tiny_dense import write_tiny_dense  # noqa: E402

HELLO = [{"role": "user", "content": "Hello there"}]


@contextlib.contextmanager
def serving(app):
    """`app` behind the servers' own uvicorn setup (`_server`), on a free port."""
    server = _server(app, "127.0.0.1", 0, "warning")
    with background(server) as port:
        yield server, port


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = write_tiny_dense(tmp_path_factory.mktemp("tiny"))
    with Engine.load(str(folder), device="cpu", context_length=512, max_batch=1,
                     max_queue=0) as e:
        yield e


@contextlib.contextmanager
def paused(engine: Engine):
    """The engine's forward passes wait until the block exits: a request admitted meanwhile
    holds the engine's one slot, so its queue is full."""
    gate = threading.Event()
    step = engine.runtime.step

    def held(*a, **kw):
        gate.wait(60)
        return step(*a, **kw)

    engine.runtime.step = held
    try:
        yield gate
    finally:
        gate.set()
        del engine.runtime.step  # the class's method again


def wait_until(check, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def is_full(engine: Engine) -> bool:
    from edge_readme.errors import QueueFullError

    try:
        engine.check_room()
        return False
    except QueueFullError:
        return True


def test_health_answers_while_a_handler_is_stuck_in_the_template(engine):
    """Template and tokenizer run in a worker thread: a request stuck there leaves the event
    loop free, so /health (and a second request) still answer."""
    app = create_app(engine, model_name="tiny", limits=Limits(max_tokens=8))
    entered, gate = threading.Event(), threading.Event()
    template = engine.chat_prompt

    def stuck(messages):
        entered.set()
        gate.wait(60)
        return template(messages)

    engine.chat_prompt = stuck
    try:
        with serving(app) as (_, port), httpx.Client(
                base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            done: list[int] = []
            t = threading.Thread(target=lambda: done.append(http.post(
                "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}).status_code))
            t.start()
            assert entered.wait(30)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as other:
                h = other.get("/health")
                assert h.status_code == 200 and h.json()["status"] == "ok"
                assert other.get("/v1/models").status_code == 200
            assert not done  # still stuck: /health did not wait for it
            gate.set()
            t.join(30)
            assert done == [200]
    finally:
        gate.set()
        del engine.chat_prompt


def test_full_queues_answer_429_before_the_body_is_parsed(engine):
    """Under a burst most requests are refused; they are refused before their JSON is
    parsed, checked or routed (a body that is not JSON at all still gets the 429)."""
    app = create_app(engine, model_name="tiny", limits=Limits(max_tokens=8))
    with serving(app) as (_, port), httpx.Client(base_url=f"http://127.0.0.1:{port}",
                                                 timeout=30) as http, paused(engine):
        s = engine.stream("hello", max_tokens=4)
        wait_until(lambda: is_full(engine))
        r = http.post("/v1/chat/completions", content=b"{not json",
                      headers={"content-type": "application/json"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert int(r.headers["retry-after"]) >= 1
        assert http.get("/health").status_code == 200
        s.cancel()
    s.collect()
    # with room again, the same body is checked: 400
    with serving(app) as (_, port):
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", content=b"{not json",
                       headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_routed_sheds_only_when_every_model_is_full(tmp_path):
    chat = tiny_moe(tmp_path / "tiny-chat", 0)
    coder = tiny_moe(tmp_path / "tiny-coder", 7)
    opts = dict(device="cpu", context_length=256, max_batch=1, max_queue=0)
    engines = {m: Engine.load(m, **opts) for m in (chat, coder)}
    f = Fleet.of(engines, build(spec_from([chat, coder], "linear")))
    try:
        app = create_routed_app(f, limits=Limits(max_tokens=8))
        with serving(app) as (_, port), httpx.Client(base_url=f"http://127.0.0.1:{port}",
                                                     timeout=30) as http:
            body = {"model": chat, "messages": HELLO, "max_tokens": 2}
            with paused(engines[chat]):
                s = engines[chat].stream("hello", max_tokens=4)
                wait_until(lambda: is_full(engines[chat]))
                # the coder has room: the request is parsed and goes to its own (full) model
                r = http.post("/v1/chat/completions", json=body)
                assert r.status_code == 429 and r.headers["x-edge-readme-model"] == chat
                assert http.post("/v1/chat/completions", content=b"[").status_code == 400
                with paused(engines[coder]):
                    s2 = engines[coder].stream("hello", max_tokens=4)
                    wait_until(lambda: is_full(engines[coder]))
                    r = http.post("/v1/chat/completions", content=b"[")
                    assert r.status_code == 429, r.text
                    assert "every model's queue is full" in r.json()["error"]["message"]
                    assert http.get("/health").status_code == 200
                    s2.cancel()
                s.cancel()
            s.collect(), s2.collect()
    finally:
        f.close()


def kernel_queue(sock) -> tuple[int, int]:
    """A listening socket's (connections waiting in the kernel's accept queue, its size):
    Linux reports them as tcp_info's unacked and sacked fields."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    unacked, sacked = struct.unpack_from("II", info, 24)
    return unacked, sacked


def blocking_route(app) -> tuple[threading.Event, threading.Event]:
    """GET /block holds the event loop itself (as a long callback would) until `release` is
    set; `blocked` is set once it runs."""
    blocked, release = threading.Event(), threading.Event()

    async def block(request):
        blocked.set()
        release.wait(30)
        from starlette.responses import PlainTextResponse

        return PlainTextResponse("ok")

    app.add_route("/block", block, methods=["GET"])
    return blocked, release


@pytest.mark.skipif(sys.platform != "linux", reason="reads the accept queue from TCP_INFO")
def test_a_burst_of_connections_is_accepted_a_batch_per_loop_turn():
    """Users connect all at once: the loop accepts a batch of them per turn, so a /health
    request that arrives meanwhile is answered after one batch, not after the whole burst.
    Seen inside the loop: how many connections still wait in the kernel when /health runs."""
    from edge_readme.server import app as app_module

    holder = EngineHolder()  # loading: /health answers 503 at once, no model needed
    app = create_app(holder, model_name="tiny")
    blocked, release = blocking_route(app)
    seen, listening = [], []

    async def spy(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/health":
            seen.append(kernel_queue(listening[0]))
        await app(scope, receive, send)

    burst = 4 * app_module.ACCEPT_BATCH
    with serving(spy) as (server, port):
        listening.append(server.servers[0].sockets[0])
        assert kernel_queue(listening[0]) == (0, app_module.LISTEN_BACKLOG)
        probe = socket.create_connection(("127.0.0.1", port), timeout=30)
        blocker = socket.create_connection(("127.0.0.1", port), timeout=30)
        users = []
        try:
            blocker.sendall(b"GET /block HTTP/1.1\r\nhost: x\r\n\r\n")
            assert blocked.wait(30)
            users = [socket.create_connection(("127.0.0.1", port), timeout=30)
                     for _ in range(burst)]  # the kernel completes them; the loop is held
            wait_until(lambda: kernel_queue(listening[0])[0] == burst)
            probe.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            time.sleep(0.2)  # the request is in the probe socket's buffer
            release.set()
            assert probe.recv(65536).startswith(b"HTTP/1.1 503")
        finally:
            release.set()
            for s in [probe, blocker, *users]:
                s.close()
    assert len(seen) == 1
    waiting, size = seen[0]
    assert size == app_module.LISTEN_BACKLOG
    # one batch was accepted before /health ran; the rest of the burst still waited
    assert waiting == burst - app_module.ACCEPT_BATCH, seen


def test_a_burst_of_requests_enters_the_app_a_batch_per_turn():
    """Requests that arrive together enter the app at most a batch per loop turn, in order; a
    /health request that arrives after them is answered after one batch, not after all."""
    from edge_readme.server import pacing

    app = create_app(EngineHolder(), model_name="tiny")  # loading: completions answer 503
    blocked, release = blocking_route(app)
    entered, seen = [], []

    async def spy(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/health":
            seen.append(len(entered))
        elif scope["type"] == "http" and scope["path"].endswith("completions"):
            entered.append(scope["path"])
        await app(scope, receive, send)

    burst = 4 * pacing.PER_TURN
    body = b'{"messages": [{"role": "user", "content": "hi"}]}'
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: "
               b"application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    with serving(spy) as (server, port):
        conns = [socket.create_connection(("127.0.0.1", port), timeout=30)
                 for _ in range(burst + 2)]
        try:
            wait_until(lambda: len(server.server_state.connections) == burst + 2)
            probe, blocker, users = conns[0], conns[1], conns[2:]
            blocker.sendall(b"GET /block HTTP/1.1\r\nhost: x\r\n\r\n")
            assert blocked.wait(30)
            for u in users:
                u.sendall(request)
            probe.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            time.sleep(0.2)  # every request is in its socket's buffer
            release.set()
            assert probe.recv(65536).startswith(b"HTTP/1.1 503")
            for u in users:  # every request is still answered (503: the model is loading)
                assert u.recv(65536).startswith(b"HTTP/1.1 503")
        finally:
            release.set()
            for c in conns:
                c.close()
    assert len(entered) == burst
    assert len(seen) == 1 and seen[0] <= 2 * pacing.PER_TURN, (seen, burst)


def test_paced_app_gets_the_whole_body_and_the_disconnect():
    import asyncio

    from edge_readme.server.pacing import Paced

    got = []

    async def app(scope, receive, send):
        while True:
            msg = await receive()
            got.append(msg)
            if msg["type"] != "http.request" or not msg.get("more_body"):
                break
        got.append(await receive())

    msgs = [{"type": "http.request", "body": b"ab", "more_body": True},
            {"type": "http.request", "body": b"cd", "more_body": False},
            {"type": "http.disconnect"}]

    async def run(buffer):
        got.clear()
        queue = list(msgs)

        async def receive():
            return queue.pop(0)

        await Paced(app, per_turn=1, buffer=buffer)(
            {"type": "http", "path": "/v1/completions"}, receive, None)
        return list(got)

    assert asyncio.run(run(1 << 20)) == msgs
    assert asyncio.run(run(1)) == msgs  # past the buffer the app reads the rest itself
    with pytest.raises(ValueError, match="per_turn"):
        Paced(app, per_turn=0)


def test_loaded_heap_leaves_the_garbage_collector():
    gc.unfreeze()
    try:
        settle_heap()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_loaders_call_on_ready_after_the_load_and_not_on_failure(engine):
    ready: list[str] = []
    holder = EngineHolder().start_loading(lambda progress: engine,
                                          on_ready=lambda: ready.append("one"))
    wait_until(lambda: ready == ["one"])
    assert holder.engine is engine
    failed = EngineHolder().start_loading(lambda progress: 1 / 0,
                                          on_ready=lambda: ready.append("bad"))
    wait_until(lambda: failed.stage == "failed")

    f = Fleet(["a"])
    t = load_fleet(f, lambda name, progress: engine, lambda fl: "router",
                   on_ready=lambda: ready.append("fleet"))
    t.join(30)
    g = Fleet(["a"])
    t = load_fleet(g, lambda name, progress: engine, lambda fl: 1 / 0,
                   on_ready=lambda: ready.append("bad fleet"))
    t.join(30)
    assert ready == ["one", "fleet"] and g.router_error is not None
