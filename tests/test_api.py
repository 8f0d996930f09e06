"""The embedding API (`Engine`) on a tiny random model: results, streaming, chat, threads,
cancel granularity, lifecycle and typed errors; plus the Tkinter example's worker logic."""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import pytest

from edge_readme import (
    BudgetError,
    BudgetTooSmallError,
    EdgeReadmeError,
    Engine,
    ModelFormatError,
    RequestError,
    UnknownModelError,
)
from tests.tiny_dense import write_tiny_dense

HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_tiny_dense(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def engine(folder):
    with Engine.load(str(folder), device="cpu", context_length=1024) as e:
        yield e


def test_generate_returns_text_ids_reason_and_stats(engine):
    r = engine.generate("Hello world", max_tokens=9)
    assert r.finish_reason == "length" and len(r.token_ids) == 9
    assert r.text == engine.tokenizer.decode(r.token_ids, skip_special=True)
    assert r.prompt_tokens == len(engine.tokenizer.encode("Hello world"))
    assert r.stats["completion_tokens"] == 9 and r.stats["prompt_tokens"] == r.prompt_tokens
    assert "decode_tokens_per_s" in r.stats and "memory" in r.stats


def test_stream_yields_chunks_that_join_to_generate(engine):
    want = engine.generate("Once upon", max_tokens=7)
    stream = engine.stream("Once upon", max_tokens=7)
    chunks = list(stream)
    assert [c.token_id for c in chunks[:-1]] == want.token_ids
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].finish_reason == "length" and chunks[-1].stats
    assert "".join(c.text for c in chunks) == want.text == stream.result.text


def test_prompt_as_token_ids_and_chat(engine):
    ids = engine.tokenizer.encode("abc")
    assert engine.generate(ids, max_tokens=5).token_ids == \
        engine.generate("abc", max_tokens=5).token_ids
    prompt = engine.chat_prompt(HELLO)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert engine.chat(HELLO, max_tokens=6).text == engine.generate(prompt, max_tokens=6).text
    assert "".join(c.text for c in engine.chat_stream(HELLO, max_tokens=6)) == \
        engine.chat(HELLO, max_tokens=6).text


def test_two_threads_get_the_outputs_of_sequential_runs(engine):
    prompts = ["The cat", "A dog ran", "The cat sat", "zzz", "A dog"]  # shared prefixes on purpose
    want = [engine.generate(p, max_tokens=20).token_ids for p in prompts]
    got: dict[tuple[int, int], list[int]] = {}
    start = threading.Barrier(2)

    def worker(t: int) -> None:
        start.wait()
        for rnd in range(3):
            for i, p in enumerate(prompts):
                if (i + t) % 2:
                    got[(t, rnd, i)] = engine.generate(p, max_tokens=20).token_ids
                else:
                    got[(t, rnd, i)] = [c.token_id for c in engine.stream(p, max_tokens=20)
                                        if c.token_id is not None]

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert len(got) == 2 * 3 * len(prompts)
    for (t, rnd, i), ids in got.items():
        assert ids == want[i], f"thread {t} round {rnd} prompt {prompts[i]!r}"


def test_cancel_takes_effect_within_one_token(engine, monkeypatch):
    rt, calls = engine.runtime, []
    step = rt.step
    holder = {}

    def counting_step(work, check=None, speculate=False):  # runs on the engine's worker thread
        if len(work[0][1]) == 1:  # a decode step
            calls.append(work)
            if len(calls) == 5:
                holder["stream"].cancel()
        return step(work, check, speculate)

    monkeypatch.setattr(rt, "step", counting_step)
    holder["stream"] = stream = engine.stream("Go on", max_tokens=500)
    r = stream.collect()
    assert r.finish_reason == "cancelled"
    assert len(r.token_ids) <= 6  # the token being computed when cancel came, at most


def test_cancel_during_a_long_prompt_stops_within_one_layer(engine, monkeypatch):
    rt, checks = engine.runtime, []
    step = rt.step
    holder = {}

    def cancelling_step(work, check=None, speculate=False):
        def counted() -> None:
            checks.append(1)
            if len(checks) == 1:
                holder["stream"].cancel()
            check()
        return step(work, counted, speculate)

    monkeypatch.setattr(rt, "step", cancelling_step)
    holder["stream"] = stream = engine.stream("x" * 600, max_tokens=5)
    r = stream.collect()
    assert r.finish_reason == "cancelled" and r.token_ids == []
    assert len(checks) == 1  # the first check after a layer saw the cancel


def test_cancel_of_a_queued_request(engine):
    first = engine.stream("busy", max_tokens=300)
    second = engine.stream("queued", max_tokens=300)
    second.cancel()
    assert second.collect().finish_reason == "cancelled"
    assert len(second.result.token_ids) <= 1
    assert first.collect().finish_reason == "length"


def test_close_and_context_manager(folder):
    with Engine.load(str(folder), device="cpu", context_length=64) as e:
        assert e.generate("hi", max_tokens=2).finish_reason == "length"
    with pytest.raises(EdgeReadmeError, match="closed"):
        e.generate("hi", max_tokens=2)
    e.close()  # a second close is a no-op


BAD_REQUESTS = [
    (dict(prompt="hi", max_tokens=0), "max_tokens"),
    (dict(prompt="hi", max_tokens="10"), "max_tokens"),
    (dict(prompt="hi", max_tokens=True), "max_tokens"),
    (dict(prompt=""), "empty"),
    (dict(prompt=[]), "empty"),
    (dict(prompt=[1, 10 ** 6]), "outside the vocabulary"),
    (dict(prompt=3.5), "string or a list"),
    (dict(prompt="y" * 2000), "the context holds"),
]


@pytest.mark.parametrize("kw,match", BAD_REQUESTS)
def test_bad_requests_raise_request_error(engine, kw, match):
    with pytest.raises(RequestError, match=match):
        engine.stream(kw.pop("prompt"), **kw)


def test_bad_messages_raise_request_error(engine):
    with pytest.raises(RequestError, match="messages"):
        engine.chat("not a list")
    with pytest.raises(RequestError, match=r"messages\[0\]"):
        engine.chat([{"role": "user"}])


def test_load_errors_are_typed(folder, tmp_path):
    with pytest.raises(BudgetTooSmallError, match="--memory-budget") as e:
        Engine.load(str(folder), device="cpu", memory_budget=1000)
    assert e.value.minimum_bytes > e.value.budget_bytes == 1000
    with pytest.raises(BudgetError, match="cannot parse"):
        Engine.load(str(folder), device="cpu", memory_budget="lots")
    broken = write_tiny_dense(tmp_path / "broken")
    (broken / "tokenizer.json").unlink()
    with pytest.raises(ModelFormatError, match="tokenizer.json"):
        Engine.load(str(broken), device="cpu")
    with pytest.raises(UnknownModelError, match="no-such-model"):
        Engine.load("no-such-model")


# ---------------------------------------------------------------- the Tkinter example


def _tk_chat():
    path = Path(__file__).resolve().parents[1] / "examples" / "tk_chat.py"
    spec = importlib.util.spec_from_file_location("tk_chat", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # must not need a display
    return module


def _drain(session, seconds: float = 20.0) -> list[tuple]:
    events, deadline = [], time.monotonic() + seconds
    while not events or events[-1][0] not in ("done", "error"):
        assert time.monotonic() < deadline, "the worker did not finish"
        events += session.poll()
        time.sleep(0.01)
    return events


def test_tk_chat_worker_streams_and_keeps_history(engine):
    session = _tk_chat().ChatSession(engine, max_tokens=8)
    session.send("Hello there")
    assert session.busy
    events = _drain(session)
    text = "".join(e[1] for e in events if e[0] == "text")
    assert events[-1][0] == "done" and events[-1][1].finish_reason == "length"
    assert text == engine.chat(HELLO, max_tokens=8).text
    assert session.messages == HELLO + [{"role": "assistant", "content": text}]
    assert not session.busy


def test_tk_chat_stop_cancels(engine):
    session = _tk_chat().ChatSession(engine, max_tokens=800)
    session.send("Tell me everything")
    while not any(e[0] == "text" for e in session.poll()):
        time.sleep(0.005)
    session.stop()
    assert _drain(session)[-1][1].finish_reason in ("cancelled", "stop")
    with pytest.raises(RuntimeError, match="busy"):
        session.send("a")
        session.send("b")
    _drain(session)


def test_tk_window_streams_into_the_text_widget(engine):
    tk = pytest.importorskip("tkinter")
    try:
        root = tk.Tk()
    except tk.TclError:
        pytest.skip("no display")
    try:
        mod = _tk_chat()
        window = mod.ChatWindow(root, mod.ChatSession(engine, max_tokens=8))
        window.entry.insert(0, "Hello there")
        window.send()
        deadline = time.monotonic() + 20
        while str(window.send_button["state"]) == "disabled":
            assert time.monotonic() < deadline
            root.update()
            time.sleep(0.01)
        assert "you: Hello there\nassistant: " in window.log.get("1.0", "end")
        assert str(window.status["text"]).startswith("8 tokens")  # random bytes: check count
    finally:
        root.destroy()


def test_stop_string_keeps_the_text_before_it(engine):
    full = engine.generate("hello", max_tokens=24).text
    assert len(full) > 6
    stop = full[3:6]
    r = engine.generate("hello", max_tokens=24, stop=[stop])
    assert r.finish_reason == "stop"
    assert r.text == full[:full.index(stop)]
    streamed = "".join(c.text for c in engine.stream("hello", max_tokens=24, stop=[stop]))
    assert streamed == r.text
