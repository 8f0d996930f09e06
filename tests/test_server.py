"""The OpenAI-compatible server, run for real: uvicorn on a free 127.0.0.1 port, a tiny random
model, and real clients (httpx and the official `openai` package)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from edge_readme import Engine, ModelFormatError  # noqa: E402
from edge_readme.server import EngineHolder, Limits, create_app, serve_loading  # noqa: E402
from tests.serving_util import background  # noqa: E402
from tests.tiny_dense import write_tiny_dense  # noqa: E402

KEY = "sekret"
LIMITS = Limits(max_prompt_tokens=300, max_tokens=4000, max_body_bytes=20_000)
HELLO = [{"role": "user", "content": "Hello there"}]


@contextlib.contextmanager
def running(app):
    """Serve `app` from a background thread on a free port; yield the base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    with background(server) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = write_tiny_dense(tmp_path_factory.mktemp("tiny"))
    with Engine.load(str(folder), device="cpu", context_length=4096) as e:
        yield e


@pytest.fixture(scope="module")
def app(engine):
    return create_app(engine, api_key=KEY, limits=LIMITS, model_name="tiny")


@pytest.fixture(scope="module")
def url(app):
    with running(app) as base:
        yield base


@pytest.fixture()
def http(url):
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=30) as c:
        yield c


@pytest.fixture()
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


# ---------------------------------------------------------------- happy paths


def test_health_and_models(http, client):
    h = httpx.get(str(http.base_url) + "/health")  # no key needed
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert h.json()["progress"] == {"stage": "ready", "fraction": 1.0}
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_chat_matches_the_engine(client, engine):
    want = engine.chat(HELLO, max_tokens=12)
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12,
                                       temperature=0)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == want.prompt_tokens
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.total_tokens == want.prompt_tokens + len(want.token_ids)


def test_chat_stream_matches_non_stream(client):
    kw = dict(model="tiny", messages=HELLO, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_plain_and_stream(client, engine):
    want = engine.generate("Once upon", max_tokens=10)
    r = client.completions.create(model="tiny", prompt="Once upon", max_tokens=10,
                                  temperature=0)
    assert r.choices[0].text == want.text and r.usage.prompt_tokens == want.prompt_tokens
    parts = client.completions.create(model="tiny", prompt="Once upon", max_tokens=10,
                                      temperature=0, stream=True)
    assert "".join(p.choices[0].text for p in parts if p.choices) == want.text
    ids = engine.tokenizer.encode("Once upon")
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0)
    assert r.choices[0].text == want.text


def test_sse_wire_format(http):
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 4, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][6:])
    assert last["object"] == "text_completion" and last["choices"][0]["finish_reason"] == "length"


def test_stop_sequences_and_seeded_sampling(client):
    kw = dict(model="tiny", prompt="Hello", max_tokens=16, temperature=0.9, seed=7)
    a = client.completions.create(**kw).choices[0].text
    assert client.completions.create(**kw).choices[0].text == a
    if len(a) > 3:
        r = client.completions.create(**{**kw, "stop": [a[2:4]]})
        assert r.choices[0].finish_reason == "stop" and a[2:4] not in r.choices[0].text


# ---------------------------------------------------------------- refusals


def test_api_key(url):
    r = httpx.post(url + "/v1/chat/completions", json={"messages": HELLO})
    assert error_of(r, 401)["code"] == "invalid_api_key"
    r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert error_of(r, 401)["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny", messages=HELLO)


CHAT_REFUSALS = [
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    ({"messages": HELLO, "max_tokens": "10"}, 400, "max_tokens"),
    ({"messages": HELLO, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": HELLO, "max_tokens": 4001}, 400, "max_tokens"),
    ({"messages": HELLO, "max_completion_tokens": 1.5}, 400, "max_completion_tokens"),
    ({"messages": HELLO, "temperature": 5}, 400, "temperature"),
    ({"messages": HELLO, "temperature": "hot"}, 400, "temperature"),
    ({"messages": HELLO, "top_p": 1.5}, 400, "top_p"),
    ({"messages": HELLO, "top_k": -1}, 400, "top_k"),
    ({"messages": HELLO, "stop": 3}, 400, "stop"),
    ({"messages": HELLO, "n": 2}, 400, "n"),
    ({"messages": HELLO, "stream": "yes"}, 400, "stream"),
    ({"messages": HELLO, "model": "gpt-4"}, 404, "model"),
    ({"messages": [{"role": "user", "content": "x" * 400}]}, 400, "messages"),
]


@pytest.mark.parametrize("body,status,param", CHAT_REFUSALS)
def test_chat_refusals(http, body, status, param):
    err = error_of(http.post("/v1/chat/completions", json=body), status)
    assert err["param"] == param


@pytest.mark.parametrize("body,param", [({"prompt": 5}, "prompt"), ({"prompt": []}, "prompt"),
                                        ({"prompt": ["a", "b"]}, "prompt"),
                                        ({"prompt": [1, 99999]}, "prompt")])
def test_completion_refusals(http, body, param):
    assert error_of(http.post("/v1/completions", json=body), 400)["param"] == param


def test_prompt_over_limit_is_named(http):
    err = error_of(http.post("/v1/completions", json={"prompt": "y" * 301}), 400)
    assert err["code"] == "context_length_exceeded" and "301" in err["message"]


def test_malformed_bodies(http):
    r = http.post("/v1/chat/completions", content=b"{not json",
                  headers={"content-type": "application/json"})
    assert error_of(r, 400)["code"] == "invalid_json"
    assert error_of(http.post("/v1/completions", json=[1, 2]), 400)["code"] == "invalid_json"
    assert error_of(http.get("/v1/nothing"), 404)["code"] == "not_found"
    error_of(http.get("/v1/chat/completions"), 405)


def test_body_size_limit(http):
    big = {"prompt": "z" * 30_000}
    assert error_of(http.post("/v1/completions", json=big), 413)["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit holds while reading
        yield json.dumps(big).encode()

    r = http.post("/v1/completions", content=chunked())
    assert error_of(r, 413)["code"] == "request_too_large"


def test_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=HELLO, temperature=3)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HELLO)


# ---------------------------------------------------------------- disconnects and loading


def wait_for(predicate, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_stream_disconnect_cancels(http, app):
    served = app.state.holder.served
    before = served["cancelled"]
    body = {"prompt": "Go on", "max_tokens": 4000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    # leaving the block closes the connection mid-stream
    wait_for(lambda: served["cancelled"] > before)


def test_non_stream_disconnect_cancels(url, app):
    served = app.state.holder.served
    before = served["cancelled"]
    body = {"prompt": "Go on", "max_tokens": 4000, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, timeout=0.3,
                   headers={"Authorization": f"Bearer {KEY}"})
    wait_for(lambda: served["cancelled"] > before)


def test_health_reports_loading_then_ready(engine):
    release = threading.Event()

    def load(progress):
        progress("read", 0.5)
        release.wait(10)
        return engine

    holder = EngineHolder().start_loading(load)
    with running(create_app(holder, model_name="tiny")) as base:
        wait_for(lambda: holder.stage == "read")
        h = httpx.get(base + "/health")
        assert h.status_code == 503
        assert h.json()["status"] == "loading"
        assert h.json()["progress"] == {"stage": "read", "fraction": 0.5}
        r = httpx.post(base + "/v1/completions", json={"prompt": "hi"})
        assert error_of(r, 503)["code"] == "model_loading"
        release.set()
        wait_for(lambda: httpx.get(base + "/health").status_code == 200)
        r = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_failed_load_stops_serve_loading_with_its_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def load(progress):
        raise ModelFormatError("broken.gguf: truncated")

    with pytest.raises(ModelFormatError, match="truncated"):
        serve_loading(load, "broken", port=port, log_level="warning")


def test_port_in_use_is_one_line_error():
    from edge_readme import EdgeReadmeError
    from edge_readme.server.app import check_port

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(EdgeReadmeError, match="cannot listen"):
            check_port("127.0.0.1", s.getsockname()[1])


def test_cli_serve_reports_a_bad_model_in_one_line(tmp_path):
    from click.testing import CliRunner

    from edge_readme.cli.serve import serve_command

    missing = str(tmp_path / "missing.gguf")
    res = CliRunner().invoke(serve_command, ["--model", missing, "--port", "0",
                                             "--log-level", "warning"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1].startswith(f"error: {missing}: no such file")
