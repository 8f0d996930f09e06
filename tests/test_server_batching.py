"""`serve` with continuous batching: concurrent streaming clients all finish, a full queue gets
429 with Retry-After (never a hang), and a client that disconnects frees its sequence slot."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from edge_readme import Engine  # noqa: E402
from edge_readme.server import Limits, create_app  # noqa: E402
from tests.test_server import running  # noqa: E402
from tests.tiny_dense import write_tiny_dense  # noqa: E402


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = write_tiny_dense(tmp_path_factory.mktemp("tiny"))
    with Engine.load(str(folder), device="cpu", context_length=512, max_batch=4,
                     max_queue=4, schedule="decode-first") as e:
        yield e


@pytest.fixture(scope="module")
def url(engine):
    with running(create_app(engine, limits=Limits(), model_name="tiny")) as base:
        yield base


def stream_one(url: str, i: int, out: dict, max_tokens: int = 24) -> None:
    body = {"model": "tiny", "prompt": f"client {i} says", "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True}
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            if r.status_code != 200:
                r.read()
                out[i] = (r.status_code, r.headers.get("retry-after"), r.json())
                return
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
            out[i] = (200, lines[-1], len(lines))
    except Exception as e:  # reported by the test
        out[i] = ("exception", repr(e), 0)


def test_concurrent_streams_finish_or_get_429(url, engine):
    out: dict = {}
    threads = [threading.Thread(target=stream_one, args=(url, i, out)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(out) == 16 and not any(t.is_alive() for t in threads)
    ok = [v for v in out.values() if v[0] == 200]
    full = [v for v in out.values() if v[0] == 429]
    assert len(ok) + len(full) == 16, out
    assert len(ok) >= 8  # four running plus four queued were always admitted
    assert all(v[1] == "data: [DONE]" for v in ok)
    for _, retry, body in full:
        assert int(retry) >= 1 and body["error"]["code"] == "queue_full"
    assert max(n for n, _, _ in engine.step_log) > 1  # requests shared forward passes


def test_disconnect_frees_the_slot(url, engine):
    body = {"model": "tiny", "prompt": "long one", "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break
        assert engine._sched.running
    deadline = time.monotonic() + 10
    while engine._sched.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine._sched.running
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "after",
                                                  "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
