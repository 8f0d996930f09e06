"""The public Python API: `Engine.load(...)`, `generate`, `stream`, `chat`, `close`.

One worker thread owns the runtime, so the engine is safe to call from many threads. Requests in
flight are batched continuously: each step the scheduler (`scheduler.py`) picks decode tokens and
prompt chunks of up to `max_batch` sequences, the runtime runs one forward pass over them, and the
worker samples each request's next token with its own sampler. Past `max_queue` waiting requests,
`stream` raises `QueueFullError`. A request is cancelled within one step, or within one layer
while its prompt is being read. The engine knows nothing about HTTP.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .errors import CancelledError, EdgeReadmeError, QueueFullError, RequestError
from .loader import load_model
from .registry import resolve
from .runtime import Runtime, RuntimeOptions, StepStats
from .sampling import Sampler, SamplingParams
from .scheduler import Scheduler, Seq, distinct_experts
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
    # worker-side state while the request runs
    seq: Any = None
    sampler: Any = None
    decoder: Any = None
    text: str = ""
    sent: int = 0  # text[:sent] is delivered
    out_ids: list[int] = field(default_factory=list)
    stats: StepStats = field(default_factory=StepStats)
    t0: float = 0.0
    ttft: float = 0.0
    cache_before: dict | None = None
    spec_before: tuple[int, int] = (0, 0)
    future: list = field(default_factory=list)  # (layer, expert) keys of the prompt


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


_OPEN: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_engines() -> None:
    """Stop every engine's worker before the interpreter tears torch down: a worker still alive
    in torch at exit aborted the process ("terminate called without an active exception")."""
    for engine in list(_OPEN):
        try:
            engine.close()
        except Exception:  # noqa: BLE001 - exiting anyway; never mask the program's own error
            pass


class Engine:
    def __init__(self, runtime: Runtime, tokenizer: Tokenizer, path: Path, name: str,
                 schedule: str = "fcfs", max_queue: int | None = None, exact: bool = False,
                 fairness: int = 4, expert_cap: int | None = None, cap_loads_only: bool = True):
        self.runtime, self.tokenizer, self.path, self.name = runtime, tokenizer, path, name
        if max_queue is not None and (not isinstance(max_queue, int) or max_queue < 0):
            raise EdgeReadmeError(f"--max-queue: expected an integer >= 0, got {max_queue!r}")
        moe = runtime.config.moe
        if expert_cap is None and moe is not None:
            expert_cap = max(1, moe.num_experts // 2)
        self.max_queue, self.exact = max_queue, bool(exact)
        budget = max(runtime.options.prefill_chunk, len(runtime.slots))  # every decode fits
        # the expert cap counts only experts to load, when the cache cannot hold them all
        resident = (runtime.cache.contains if runtime.cache is not None and cap_loads_only
                    else None)
        self._sched = Scheduler(schedule, len(runtime.slots), budget,
                                fairness=fairness, expert_cap=expert_cap, exact=self.exact,
                                choose_slot=runtime.best_slot, resident=resident)
        # recent steps: (sequences, tokens, mean distinct experts per layer or None)
        self.step_log: list[tuple[int, int, float | None]] = []
        self.steps_run = 0
        c = runtime.config
        self.eos_ids = set(c.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        for special in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
            tid = tokenizer.token_to_id(special)
            if tid is not None:
                self.eos_ids.add(tid)
        self._queue: queue.Queue[_Request | _Control | None] = queue.Queue()
        self._pending: list[_Request] = []
        self._lock = threading.Lock()
        self._closed = False
        self._reset = False
        self.totals = StepStats()
        self._worker = threading.Thread(target=self._serve, name="edge-readme-engine", daemon=True)
        self._worker.start()
        _OPEN.add(self)  # closed at interpreter exit if the caller did not close it

    # ------------------------------------------------------------------ construction

    @classmethod
    def load(cls, model: str | Path = "smollm2-135m-readme", *,
             memory_budget: int | str | None = None,
             device: str = "auto", dtype: str | None = None, policy: str = "belady",
             context_length: int = 2048, on_progress: Progress | None = None,
             **options: Any) -> "Engine":
        """Load a registry name, a `.gguf` file or a model folder under a memory budget.

        Batching: `max_batch` sequence slots (each a KV cache in the memory plan), `schedule`
        one of fcfs, decode-first, prefill-first, expert-aware, `max_queue` waiting requests
        before `stream` refuses, `exact` one forward pass per request (tokens exactly as alone).
        """
        progress = on_progress or (lambda stage, frac: None)
        batching = {k: options.pop(k) for k in ("schedule", "max_queue", "exact", "fairness",
                                                "expert_cap", "cap_loads_only") if k in options}
        if batching.get("schedule") is not None:
            from .scheduler import POLICIES

            if batching["schedule"] not in POLICIES:
                raise EdgeReadmeError(f"--schedule: unknown {batching['schedule']!r}; use one "
                                      "of " + ", ".join(POLICIES))
        path = resolve(model, progress=progress)
        from .memory import bounded_heap, trim_heap

        progress("read", 0.0)
        loaded = load_model(path)
        progress("read", 1.0)
        tokenizer = Tokenizer(loaded.tokenizer, loaded.chat_template)
        opts = RuntimeOptions(device=device, dtype=dtype, context_length=context_length,
                              memory_budget=memory_budget, policy=policy, **options)
        from .cache.policies import make_policy

        make_policy(policy)  # refuse an unknown policy before loading weights
        with bounded_heap():  # the build's big temporaries leave the process when freed
            runtime = Runtime(loaded, opts, on_progress=progress)
            del loaded  # the loader's open files, and the heap its reads held
        trim_heap()
        try:
            return cls(runtime, tokenizer, path, str(model),
                       **{k: v for k, v in batching.items() if v is not None})
        except BaseException:
            runtime.close()
            raise

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
            self._check_room()
            self._pending.append(req)
            self._queue.put(req)
        return Stream(req)

    def check_room(self) -> None:
        """Raise QueueFullError if `stream` would refuse a request now: a server under a burst
        answers 429 before spending time on the prompt's template and tokens."""
        with self._lock:
            self._check_room()

    def _check_room(self) -> None:
        if self._closed:
            raise EdgeReadmeError("the engine is closed")
        waiting = len(self._pending)
        if self.max_queue is not None and waiting >= self.max_queue + self._free_slots():
            raise QueueFullError(
                f"{waiting} requests are already waiting for one of "
                f"{len(self.runtime.slots)} sequence slots (--max-queue {self.max_queue}); "
                "retry later", retry_after=1 + waiting // len(self.runtime.slots))

    def _free_slots(self) -> int:
        return len(self.runtime.slots) - len(self._sched.running)

    def reset(self) -> None:
        """Forget the cached sequence: the next request prefills its whole prompt."""
        self._reset = True

    def set_memory_budget(self, budget: int | str) -> dict[str, Any]:
        """Give this engine a new memory budget while it serves (CPU, a Read-ME model): its
        expert slots grow or shrink between two forward passes, evicting by the cache policy;
        the dense part and KV caches stay. Returns the new plan; raises BudgetTooSmallError
        below the minimum. Answers do not change: offloading is exact."""
        ctl = _Control(lambda: self.runtime.set_memory_budget(budget).to_json())
        with self._lock:
            if self._closed:
                raise EdgeReadmeError("the engine is closed")
            self._queue.put(ctl)
        return ctl.wait()

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
        sched = self._sched
        while True:
            block = not sched.busy()
            while True:  # take every new request; wait only when there is nothing to run
                try:
                    req = self._queue.get(block=block)
                except queue.Empty:
                    break
                if req is None:
                    for s in list(sched.running) + list(sched.waiting):
                        self._finish(s.handle, "cancelled")
                    return
                if isinstance(req, _Control):  # between two steps: no expert is in use
                    req.run()
                    continue
                try:
                    self._begin(req)
                except Exception as e:  # delivered to the caller; the engine stays usable
                    self._finish(req, "error", e)
                block = False
            try:
                self._step()
            except BaseException as e:  # delivered to the requests; the engine stays usable
                err = e if isinstance(e, Exception) else EdgeReadmeError(str(e))
                for s in list(sched.running):
                    self._finish(s.handle, "error", err)

    def _begin(self, req: _Request) -> None:
        rt = self.runtime
        req.sampler, req.decoder = Sampler(req.params), StreamDecoder(self.tokenizer)
        req.t0 = time.perf_counter()
        path = rt.route_prompt(req.ids) if rt.router is not None else None
        if path is not None:
            req.future = list(dict.fromkeys(
                (layer, e) for layer in range(path.shape[1])
                for e in torch.unique(path[:, layer]).tolist()))
        req.seq = Seq(req.ids, handle=req, path=path)
        self._sched.add(req.seq)

    def _step(self) -> None:
        rt, sched = self.runtime, self._sched
        for s in list(sched.running) + list(sched.waiting):
            if s.handle.cancelled.is_set():
                self._finish(s.handle, "cancelled")
        if self._reset and not sched.running:
            rt.reset()
            self._reset = False
        for s in sched.admit():
            req = s.handle
            with self._lock:
                self._pending.remove(req)
            s.fed = req.stats.reused_tokens = rt.assign(s.slot, s.prompt)
            req.cache_before = rt.cache.stats.to_json() if rt.cache is not None else None
            sl = rt.slots[s.slot]
            req.spec_before = (sl.speculations, sl.speculations_right)
        items = sched.next_batch()
        if not items:
            return
        distinct = None
        if rt.router is not None:  # Belady's future: the next tokens, then the queue's prompts
            chosen = {id(i.seq) for i in items}
            later = [s for s in sched.running if id(s) not in chosen] + list(sched.waiting)
            rt.set_future([k for s in later for k in _future_keys(s)])
            distinct = distinct_experts([s.path[s.fed:s.fed + len(i.tokens)] if s.prefilling
                                         else s.next_path for i in items for s in (i.seq,)])
        self.step_log.append((len(items), sum(len(i.tokens) for i in items), distinct))
        self.steps_run += 1
        del self.step_log[:-4096]
        work = [(i.seq.slot, i.tokens) for i in items]

        def check_for(reqs: list[_Request]) -> Callable[[], None]:
            def check() -> None:
                if any(r.cancelled.is_set() for r in reqs):
                    raise CancelledError("cancelled")
            return check

        start, done = time.perf_counter(), []
        try:
            if self.exact and len(work) > 1:  # one pass per request: its chunks as if alone
                for i, w in zip(items, work):
                    done.append(rt.step([w], check_for([i.seq.handle]))[0])
            else:
                done = rt.step(work, check_for([i.seq.handle for i in items]),
                               speculate=len(work) == 1)
        except CancelledError:
            pass  # the cancelled requests leave at the next step; passes already run count
        except Exception as e:  # a bad expert file, say: the requests of the failed pass fail
            failed = items[len(done):len(done) + 1] if self.exact else items
            for i in failed:
                self._finish(i.seq.handle, "error", e)
        seconds = time.perf_counter() - start
        for item, lg in zip(items, done):
            self._advance(item.seq, len(item.tokens), lg, seconds)

    def _advance(self, s: Seq, n: int, logits, seconds: float) -> None:
        """Account for the n tokens just fed for `s`; sample and deliver its next token."""
        req, st = s.handle, s.handle.stats
        if s.prefilling:
            s.fed += n
            st.prefill_tokens += n
            st.prefill_seconds += seconds
            if s.prefilling:
                return
            req.ttft = time.perf_counter() - req.t0
        else:
            s.next_token = s.next_path = None
            st.decode_tokens += 1
            st.decode_seconds += seconds
        token = req.sampler(logits)
        if token in self.eos_ids and not req.ignore_eos:
            return self._finish(req, "stop")
        req.out_ids.append(token)
        req.text += req.decoder.push(token)
        cut = _stop_at(req.text, req.stop)
        if cut is not None:
            req.text = req.text[:cut]
            return self._finish(req, "stop")
        safe = len(req.text) - _held_back(req.text, req.stop)
        req.out.put(Chunk(req.text[req.sent:safe], token))
        req.sent = safe
        if len(req.out_ids) >= req.max_tokens:
            return self._finish(req, "length")
        s.next_token = token
        s.next_path = self.runtime.preroute(s.slot, [token])  # the scheduler sees its path

    def _finish(self, req: _Request, reason: str, error: Exception | None = None) -> None:
        s, rt = req.seq, self.runtime
        slot = s.slot if s is not None else None
        if s is not None:
            self._sched.remove(s)
        with self._lock:
            if req in self._pending:
                self._pending.remove(req)
        if error is not None:
            req.out.put(error)
            return
        if reason != "stop" and req.decoder is not None:
            req.text += req.decoder.flush()
        if slot is not None:
            sl = rt.slots[slot]
            req.stats.speculations = sl.speculations - req.spec_before[0]
            req.stats.speculations_right = sl.speculations_right - req.spec_before[1]
        if not req.ttft:
            req.ttft = time.perf_counter() - req.t0
        report = self._report(req.stats, req.cache_before, len(req.ids), len(req.out_ids),
                              req.ttft)
        req.out.put(Chunk(req.text[req.sent:], None, reason, report))

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
                     if isinstance(now[k], (int, float)) and k not in (
                         "hit_ratio", "peak_resident_bytes", "low_precision_rate")}
            lookups = delta.get("hits", 0) + delta.get("misses", 0)
            delta["hit_ratio"] = round(delta.get("hits", 0) / lookups, 4) if lookups else None
            uses = lookups + delta.get("low_precision", 0)  # --miss-precision's fire rate
            delta["low_precision_rate"] = round(delta.get("low_precision", 0) / uses, 4) \
                if uses else None
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
                "moe": rt.config.moe is not None, "memory": rt.memory_report(),
                "batching": {"max_batch": len(rt.slots), "schedule": self._sched.policy,
                             "max_queue": self.max_queue, "exact": self.exact}}

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


class _Control:
    """Work the engine's own thread runs between two steps (a budget change), and its answer."""

    def __init__(self, fn: Callable[[], Any]):
        self.fn, self.done = fn, threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:  # handed to the caller
            self.error = e
        self.done.set()

    def wait(self) -> Any:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


def _future_keys(s: Seq) -> list[tuple[int, int]]:
    """The (layer, expert) keys a sequence needs next: its next token's path, else its prompt's."""
    if s.next_path is not None and not s.prefilling:
        return list(enumerate(s.next_path[0].tolist()))
    return s.handle.future


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
