"""Server limits against hostile requests, over loopback with the real server (`_server`, the
protocol the CLI runs): JSON depth, lone surrogates, sampler values, API keys and Authorization
headers, silent connections, the per-request deadline, and bounded chat templates."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from click.testing import CliRunner  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from edge_readme import Engine  # noqa: E402
from edge_readme.errors import EdgeReadmeError, RequestError  # noqa: E402
from edge_readme.sampling import SamplingParams  # noqa: E402
from edge_readme.server import Limits, create_app  # noqa: E402
from edge_readme.server import protocol as P  # noqa: E402
from edge_readme.server.app import _server, check_api_key  # noqa: E402
from edge_readme.tokenizer import Tokenizer  # noqa: E402
from tests.serving_util import background  # noqa: E402
from tests.tiny_dense import write_tiny_dense  # noqa: E402
from tests.tiny_models import tiny_spec  # noqa: E402

KEY = "k3y-of-ascii"
HELLO = [{"role": "user", "content": "Hello there"}]
AUTH = {"Authorization": f"Bearer {KEY}"}


@contextlib.contextmanager
def running(app, header_timeout: float = 1.0):
    server = _server(app, "127.0.0.1", 0, "warning", header_timeout=header_timeout)
    with background(server) as port:
        yield port


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = write_tiny_dense(tmp_path_factory.mktemp("tiny"))
    with Engine.load(str(folder), device="cpu", context_length=4096) as e:
        yield e


@pytest.fixture(scope="module")
def port(engine):
    # 0.5 s: far below the ~4,000 tokens the long request asks for, far above a 3-token answer
    limits = Limits(max_tokens=100_000, max_body_bytes=1 << 20, request_timeout=0.5)
    with running(create_app(engine, api_key=KEY, limits=limits, model_name="tiny")) as p:
        yield p


@pytest.fixture()
def http(port):
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=30) as c:
        yield c


def raw_request(port: int, data: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def post(path: str, body: bytes, headers: bytes = b"") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n").encode() + headers \
        + b"\r\n" + body


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def test_lone_surrogate_is_400(port):
    body = b'{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}'
    out = raw_request(port, post("/v1/chat/completions", body, f"Authorization: Bearer {KEY}\r\n"
                                 .encode()))
    assert status_of(out) == 400 and b"invalid_json" in out and b"surrogate" in out


def test_deep_json_is_400(http):
    body = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = http.post("/v1/chat/completions", content=body,
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("field,value", [("temperature", 1e-40), ("seed", 2 ** 64),
                                         ("seed", -(2 ** 63) - 1)])
def test_sampler_values_out_of_reach_are_400(http, field, value):
    r = http.post("/v1/chat/completions", json={"messages": HELLO, field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_tiny_top_p_answers(http):
    r = http.post("/v1/chat/completions", json={"messages": HELLO, "top_p": 1e-300,
                                                "temperature": 1.0, "max_tokens": 3, "seed": 1})
    assert r.status_code == 200, r.text


def test_sampling_params_name_the_limit():
    for kw, field in (({"temperature": 1e-40}, "temperature"), ({"seed": 2 ** 64}, "seed")):
        with pytest.raises(RequestError, match=field):
            SamplingParams(**kw)
    SamplingParams(temperature=1e-6, seed=2 ** 64 - 1)


@pytest.mark.parametrize("header", [b"Authorization: Bearer \xff\xfe\r\n",
                                    b"Authorization: Basic Zm9vOmJhcg==\r\n",
                                    b"Authorization: Bearer\r\n",
                                    b"Authorization: Bearer " + b"k" * 5000 + b"\r\n",
                                    b"Authorization: \r\n"])
def test_malformed_authorization_is_401(port, header):
    out = raw_request(port, post("/v1/chat/completions", b'{"messages": []}', header))
    assert status_of(out) == 401 and b"invalid_api_key" in out


def test_api_key_must_be_printable_ascii(engine, tmp_path):
    for key in ("ключ", "with space", "tab\tkey", ""):
        with pytest.raises(EdgeReadmeError, match="--api-key"):
            check_api_key(key)
        with pytest.raises(EdgeReadmeError, match="--api-key"):
            create_app(engine, api_key=key)
    from edge_readme.cli.main import cli

    result = CliRunner().invoke(cli, ["serve", "-m", str(tmp_path), "--api-key", "ключ"])
    assert result.exit_code != 0 and "--api-key" in result.output
    assert "Traceback" not in result.output


def test_silent_connection_is_closed(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        t0 = time.monotonic()
        assert s.recv(1) == b""  # closed by the server, not by our timeout
        assert time.monotonic() - t0 < 5
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHo")  # a request line that never ends
        assert s.recv(1) == b""


def test_request_timeout_cancels_and_the_next_request_answers(http):
    t0 = time.monotonic()
    r = http.post("/v1/completions", json={"prompt": "once", "max_tokens": 100_000,
                                           "ignore_eos": True})
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "request_timeout"
    assert time.monotonic() - t0 < 10
    r = http.post("/v1/completions", json={"prompt": "once", "max_tokens": 2})
    assert r.status_code == 200


HOSTILE_TEMPLATES = {
    "nested-range": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                    "{% endfor %}",
    "nested-range-output": "{% for i in range(100000) %}{% for j in range(100000) %}x"
                           "{% endfor %}{% endfor %}",
    "lipsum": "{{ lipsum(n=3000000) }}",
    "string-times-3e8": "{{ 'x' * 300000000 }}",
    "division-by-zero": "{{ 1/0 }}",
    "range-1e9": "{{ range(10**9)|list }}",
    "power": "{{ 10 ** 100000000 }}",
    "recursive-macro": "{% macro f(n) %}{{ f(n+1) }}{% endmacro %}{{ f(0) }}",
    "center-1e9": "{{ 'x'|center(1000000000) }}",
    "percent-width": "{{ '%0999999999d' % 1 }}",
    "format-width": "{{ '{:>999999999}'.format(1) }}",
    "string-loops": "{% set s = 'x' * 1000000 %}{% for a in s %}{% for b in s %}{% endfor %}"
                    "{% endfor %}",
    "syntax-error": "{% for %}",
    "internals": "{{ ''.__class__.__mro__ }}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_TEMPLATES))
def test_hostile_template_is_a_request_error(name):
    tok = Tokenizer(tiny_spec(), HOSTILE_TEMPLATES[name])
    t0 = time.monotonic()
    with pytest.raises(RequestError, match="chat template"):
        tok.apply_chat_template(HELLO)
    assert time.monotonic() - t0 < 8


def test_hostile_template_over_http_keeps_the_server_answering(engine):
    hostile = Tokenizer(engine.tokenizer.spec, HOSTILE_TEMPLATES["nested-range"])
    saved = engine.tokenizer
    engine.tokenizer = hostile
    try:
        with running(create_app(engine, model_name="tiny")) as p, \
                httpx.Client(base_url=f"http://127.0.0.1:{p}", timeout=30) as c:
            results = []
            threads = [threading.Thread(target=lambda: results.append(c.post(
                "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2})))
                for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert [r.status_code for r in results] == [400] * 8
            r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert r.status_code == 200
    finally:
        engine.tokenizer = saved


# ---------------------------------------------------------------- request bodies, fuzzed

_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
    | st.sampled_from(["\ud800", "user", "assistant", "tiny", "", "\x00"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=10)
_fields = ["messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p",
           "top_k", "seed", "stop", "n", "stream", "stream_options", "model", "ignore_eos"]
_bodies = st.dictionaries(st.sampled_from(_fields), _values, max_size=6)


@settings(max_examples=int(os.environ.get("EDGE_README_FUZZ_EXAMPLES", "1000")),
          deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(body=_bodies)
def test_fuzzed_request_bodies_are_400_or_valid(body):
    """Every request body is refused with an APIError, or yields arguments the engine takes."""
    import json as json_module

    raw = json_module.dumps(body).encode("utf-8", "surrogatepass")
    try:
        parsed = P.parse_json(raw)
        kw = P.sampling(parsed, Limits())
        P.streaming(parsed)
        P.model_field(parsed, {"tiny"}, "tiny")
        for get in (P.messages, P.prompt):
            try:
                get(parsed)
            except P.APIError:
                pass
    except P.APIError as e:
        assert 400 <= e.status < 500 and e.message
        return
    SamplingParams(kw["temperature"], kw["top_p"], kw["top_k"], kw["seed"])


def test_lone_surrogate_through_the_python_api(engine):
    with pytest.raises(RequestError, match="surrogate"):
        engine.generate("a\ud800b", max_tokens=2)
    with pytest.raises(RequestError, match="surrogate"):
        engine.chat([{"role": "user", "content": "a\ud800"}], max_tokens=2)
