"""The public Python API: `Engine.load(...)`, `generate`, `stream`, `chat`, `close`.

One worker thread owns the runtime and serves requests in arrival order, so the engine is safe to
call from many threads: requests queue and never interleave. A request is cancelled within one
token, or within one layer while its prompt is being read. The engine knows nothing about HTTP.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .errors import CancelledError, EdgeReadmeError, RequestError
from .loader import load_model
from .registry import resolve
from .runtime import Runtime, RuntimeOptions, StepStats
from .sampling import Sampler, SamplingParams
from .tokenizer import StreamDecoder, Tokenizer

Progress = Callable[[str, float], None]


@dataclass
class Chunk:
    """One piece of a streamed reply: the text of one token (may be empty mid-UTF-8)."""

    text: str
    token_id: int | None
    finish_reason: str | None = None  # set on the last chunk: "stop", "length" or "cancelled"
    stats: dict | None = None  # set on the last chunk


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: dict
    prompt_tokens: int = 0


@dataclass
class _Request:
    ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop: tuple[str, ...]
    ignore_eos: bool = False
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    route: Any = None  # router path of the prompt, for Belady's view of queued work


class Stream:
    """Iterate to get `Chunk`s; `cancel()` from any thread stops the request within one token."""

    def __init__(self, request: _Request):
        self._req = request
        self.result: Result | None = None
        self._text: list[str] = []
        self._ids: list[int] = []

    def cancel(self) -> None:
        self._req.cancelled.set()

    def __iter__(self) -> Iterator[Chunk]:
        while self.result is None:
            item = self._req.out.get()
            if isinstance(item, BaseException):
                self.result = Result("".join(self._text), self._ids, "error", {},
                                     len(self._req.ids))
                raise item
            self._text.append(item.text)
            if item.token_id is not None:
                self._ids.append(item.token_id)
            if item.finish_reason is not None:
                self.result = Result("".join(self._text), self._ids, item.finish_reason,
                                     item.stats or {}, len(self._req.ids))
            yield item

    def collect(self) -> Result:
        for _ in self:
            pass
        assert self.result is not None
        return self.result


class Engine:
    def __init__(self, runtime: Runtime, tokenizer: Tokenizer, path: Path, name: str):
        self.runtime, self.tokenizer, self.path, self.name = runtime, tokenizer, path, name
        c = runtime.config
        self.eos_ids = set(c.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        for special in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
            tid = tokenizer.token_to_id(special)
            if tid is not None:
                self.eos_ids.add(tid)
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._pending: list[_Request] = []
        self._lock = threading.Lock()
        self._closed = False
        self._reset = False
        self.totals = StepStats()
        self._worker = threading.Thread(target=self._serve, name="edge-readme-engine", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ construction

    @classmethod
    def load(cls, model: str | Path = "smollm2-135m-readme", *,
             memory_budget: int | str | None = None,
             device: str = "auto", dtype: str | None = None, policy: str = "belady",
             context_length: int = 2048, on_progress: Progress | None = None,
             **options: Any) -> "Engine":
        """Load a registry name, a `.gguf` file or a model folder under a memory budget."""
        progress = on_progress or (lambda stage, frac: None)
        path = resolve(model, progress=progress)
        progress("read", 0.0)
        loaded = load_model(path)
        progress("read", 1.0)
        tokenizer = Tokenizer(loaded.tokenizer, loaded.chat_template)
        opts = RuntimeOptions(device=device, dtype=dtype, context_length=context_length,
                              memory_budget=memory_budget, policy=policy, **options)
        from .cache.policies import make_policy

        make_policy(policy)  # refuse an unknown policy before loading weights
        runtime = Runtime(loaded, opts, on_progress=progress)
        return cls(runtime, tokenizer, path, str(model))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(None)
        self._worker.join()
        self.runtime.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ requests

    def stream(self, prompt: str | Sequence[int], *, max_tokens: int = 256,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
               seed: int | None = None, stop: Sequence[str] = (),
               ignore_eos: bool = False, repetition_penalty: float = 1.0,
               frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
               no_repeat_ngram: int = 0) -> Stream:
        ids = self._encode(prompt)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise RequestError(f"max_tokens: expected an integer >= 1, got {max_tokens!r}")
        limit = self.runtime.context_length
        if len(ids) >= limit:
            raise RequestError(f"prompt: {len(ids)} tokens, the context holds {limit}; "
                               "shorten the prompt or raise --context-length")
        params = SamplingParams(temperature, top_p, top_k, seed, repetition_penalty,
                                frequency_penalty, presence_penalty, no_repeat_ngram)
        req = _Request(ids, params, min(max_tokens, limit - len(ids)), tuple(stop),
                       ignore_eos=bool(ignore_eos))
        with self._lock:
            if self._closed:
                raise EdgeReadmeError("the engine is closed")
            self._pending.append(req)
            self._queue.put(req)
        return Stream(req)

    def reset(self) -> None:
        """Forget the cached sequence: the next request prefills its whole prompt."""
        self._reset = True

    def generate(self, prompt: str | Sequence[int], **kw: Any) -> Result:
        return self.stream(prompt, **kw).collect()

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def chat_stream(self, messages: list[dict[str, str]], **kw: Any) -> Stream:
        return self.stream(self.chat_prompt(messages), **kw)

    def chat(self, messages: list[dict[str, str]], **kw: Any) -> Result:
        return self.chat_stream(messages, **kw).collect()

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.runtime.config.vocab_size]
            if bad:
                raise RequestError(f"prompt: token ids {bad[:5]} are outside the vocabulary "
                                   f"[0, {self.runtime.config.vocab_size})")
        else:
            raise RequestError("prompt: expected a string or a list of token ids")
        if not ids:
            raise RequestError("prompt: empty; give at least one token of text")
        return ids

    # ------------------------------------------------------------------ the worker

    def _serve(self) -> None:
        while True:
            req = self._queue.get()
            if req is None:
                return
            with self._lock:
                self._pending.remove(req)
                queued = list(self._pending)
            try:
                self._plan_queued(queued)
                self._run(req)
            except BaseException as e:  # delivered to the caller; the engine stays usable
                req.out.put(e if isinstance(e, Exception) else EdgeReadmeError(str(e)))

    def _plan_queued(self, queued: list[_Request]) -> None:
        rt = self.runtime
        if rt.router is None:
            return
        for r in queued:
            if r.route is None:
                r.route = rt.route_prompt(r.ids)
        rt.set_queued([r.route for r in queued if r.route is not None])

    def _run(self, req: _Request) -> None:
        rt, stats = self.runtime, StepStats()
        if self._reset:
            rt.tokens, self._reset = [], False
        cache_before = rt.cache.stats.to_json() if rt.cache is not None else None
        sampler, decoder = Sampler(req.params), StreamDecoder(self.tokenizer)
        text, sent, out_ids, reason = "", 0, [], "length"  # text[:sent] is delivered
        t0 = ttft = time.perf_counter()

        def check() -> None:
            if req.cancelled.is_set():
                raise CancelledError("cancelled")

        try:
            logits = rt.prefill(req.ids, stats, check)
            ttft = time.perf_counter() - t0
            while True:
                token = sampler(logits)
                if token in self.eos_ids and not req.ignore_eos:
                    reason = "stop"
                    break
                out_ids.append(token)
                text += decoder.push(token)
                cut = _stop_at(text, req.stop)
                if cut is not None:
                    text, reason = text[:cut], "stop"
                    break
                safe = len(text) - _held_back(text, req.stop)
                req.out.put(Chunk(text[sent:safe], token))
                sent = safe
                if len(out_ids) >= req.max_tokens or req.cancelled.is_set():
                    reason = "cancelled" if req.cancelled.is_set() else "length"
                    break
                logits = rt.decode(token, stats)
        except CancelledError:
            reason = "cancelled"
        if reason != "stop":
            text += decoder.flush()
        tail = text[sent:]
        report = self._report(stats, cache_before, len(req.ids), len(out_ids), ttft)
        req.out.put(Chunk(tail, None, reason, report))

    def _report(self, s: StepStats, cache_before: dict | None, n_prompt: int, n_out: int,
                ttft: float) -> dict:
        t = self.totals
        for f in ("prefill_tokens", "prefill_seconds", "decode_tokens", "decode_seconds",
                  "speculations", "speculations_right"):
            setattr(t, f, getattr(t, f) + getattr(s, f))
        rep: dict[str, Any] = {
            "prompt_tokens": n_prompt,
            "completion_tokens": n_out,
            "reused_prompt_tokens": s.reused_tokens,
            "time_to_first_token_s": round(ttft, 4),
            "prefill_tokens_per_s": _rate(s.prefill_tokens, s.prefill_seconds),
            "decode_tokens_per_s": _rate(s.decode_tokens, s.decode_seconds),
        }
        rt = self.runtime
        if rt.cache is not None and cache_before is not None:
            now = rt.cache.stats.to_json()
            delta = {k: (now[k] - cache_before[k]) for k in now
                     if isinstance(now[k], (int, float)) and k not in ("hit_ratio",
                                                                       "peak_resident_bytes")}
            lookups = delta.get("hits", 0) + delta.get("misses", 0)
            delta["hit_ratio"] = round(delta.get("hits", 0) / lookups, 4) if lookups else None
            delta["peak_resident_bytes"] = now.get("peak_resident_bytes")
            delta["policy"] = rt.options.policy
            rep["cache"] = delta
            rep["speculation"] = {"guesses": s.speculations, "right": s.speculations_right}
        rep["memory"] = rt.memory_report()
        return rep

    # ------------------------------------------------------------------ info

    def info(self) -> dict[str, Any]:
        rt = self.runtime
        return {"model": self.name, "path": str(self.path), "device": str(rt.device),
                "dtype": str(rt.dtype).replace("torch.", ""), "context_length": rt.context_length,
                "moe": rt.config.moe is not None, "memory": rt.memory_report()}

    def stats(self) -> dict[str, Any]:
        t, rt = self.totals, self.runtime
        d: dict[str, Any] = {
            "prefill_tokens_per_s": _rate(t.prefill_tokens, t.prefill_seconds),
            "decode_tokens_per_s": _rate(t.decode_tokens, t.decode_seconds),
            "memory": rt.memory_report(),
        }
        if rt.cache is not None:
            d["cache"] = rt.cache.stats.to_json()
            d["speculation"] = {"guesses": t.speculations, "right": t.speculations_right}
        return d


def _stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of text that could still begin a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-n:]):
                best = n
                break
    return best


def _rate(n: int, s: float) -> float | None:
    return round(n / s, 2) if s > 0 and n else None


__all__ = ["Chunk", "Engine", "Result", "Stream"]
