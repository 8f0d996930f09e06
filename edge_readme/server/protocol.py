"""OpenAI wire format: request bodies checked into engine arguments, results shaped into bodies.

Pure functions over dicts; no HTTP framework and no engine calls here, so every check can be
tested on its own. Unknown request fields are ignored, as OpenAI-compatible servers commonly do.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. `max_prompt_tokens=None` means the context length - 1."""

    max_prompt_tokens: int | None = None
    max_tokens: int = 2048  # the largest `max_tokens` a request may ask for
    default_max_tokens: int = 512  # used when a request gives none
    max_body_bytes: int = 1 << 20
    request_timeout: float | None = None  # seconds from queueing to the last token; None = none


class APIError(Exception):
    """An error with an HTTP status and an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


MAX_JSON_DEPTH = 32  # OpenAI bodies nest a few levels (messages -> content parts -> ...)


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON ({e}); send a JSON object",
                  code="invalid_json") from None
    except RecursionError:
        raise bad(f"the request body nests deeper than {MAX_JSON_DEPTH} levels",
                  code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"the request body is a JSON {type(body).__name__}; expected an object",
                  code="invalid_json")
    _check_tree(body)
    return body


def _check_tree(body: Any) -> None:
    """Depth at most MAX_JSON_DEPTH, and every string (keys too) valid Unicode text: a lone
    surrogate escape such as "\\ud800" cannot be encoded and is refused here. Iterative."""
    stack = [(body, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise bad(f"the request body nests deeper than {MAX_JSON_DEPTH} levels",
                      code="invalid_json")
        items = node.items() if isinstance(node, dict) else enumerate(node) \
            if isinstance(node, list) else ()
        for key, value in items:
            for s in (key, value):
                if isinstance(s, str):
                    try:
                        s.encode("utf-8")
                    except UnicodeEncodeError:
                        raise bad("the request body holds a string that is not valid Unicode "
                                  "text (a lone surrogate escape such as \\ud800)",
                                  code="invalid_json") from None
            if isinstance(value, (dict, list)):
                stack.append((value, depth + 1))


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(f"{name}: expected a number in [{lo}, {hi}], got {v!r}", name)
    if not lo <= v <= hi:
        raise bad(f"{name}: {v} is outside [{lo}, {hi}]", name)
    return float(v)


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int | None = None
             ) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"{name}: expected an integer, got {v!r}", name)
    if v < lo or (hi is not None and v > hi):
        top = f" and <= {hi} (this server's limit)" if hi is not None else ""
        raise bad(f"{name}: expected an integer >= {lo}{top}, got {v}", name)
    return v


def _flag(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(f"{name}: expected true or false, got {v!r}", name)
    return v


def sampling(body: dict, limits: Limits) -> dict[str, Any]:
    """Engine keyword arguments of a request: max_tokens, temperature, top_p, top_k, seed, stop,
    ignore_eos."""
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = _integer(body, name, limits.default_max_tokens, 1, limits.max_tokens)
    n = _integer(body, "n", 1, 1)
    if n != 1:
        raise bad(f"n: this server returns one choice per request; got n={n}", "n")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 \
            or not all(isinstance(s, str) and s for s in stop):
        raise bad("stop: expected a non-empty string or a list of up to 4 of them", "stop")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    kw = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0) or 1.0,
        "top_k": _integer(body, "top_k", 0, 0),
        "seed": _integer(body, "seed", None, -(2 ** 63), 2 ** 64 - 1),
        "stop": tuple(stop),
        "ignore_eos": _flag(body, "ignore_eos"),  # an extension (as in vLLM): run to max_tokens
        **penalties(body, temperature),
    }
    _check_sampler(kw)
    return kw


def _check_sampler(kw: dict[str, Any]) -> None:
    """The sampler's own limits (as the CLI and the Python API get them), answered as 400s."""
    from ..errors import RequestError
    from ..sampling import SamplingParams

    try:
        SamplingParams(temperature=kw["temperature"], top_p=kw["top_p"], top_k=kw["top_k"],
                       seed=kw["seed"])
    except RequestError as e:
        raise bad(str(e), str(e).split(":", 1)[0]) from None


def penalties(body: dict, temperature: float) -> dict[str, Any]:
    """OpenAI's frequency/presence penalties plus the repetition_penalty and no_repeat_ngram_size
    extensions (as in vLLM / HF); unset ones follow sampling.chat_penalties."""
    from edge_readme.sampling import chat_penalties

    rep = _number(body, "repetition_penalty", None, 0.0, 10.0)  # type: ignore[arg-type]
    if rep is not None and rep <= 0:
        raise bad(f"repetition_penalty: expected a number in (0, 10], got {rep}",
                  "repetition_penalty")
    return chat_penalties(
        temperature, repetition_penalty=rep,
        frequency_penalty=_number(body, "frequency_penalty", None, -2.0, 2.0),  # type: ignore
        presence_penalty=_number(body, "presence_penalty", None, -2.0, 2.0),  # type: ignore
        no_repeat_ngram=_integer(body, "no_repeat_ngram_size", None, 0))


def streaming(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage) of a request."""
    stream = _flag(body, "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad("stream_options: expected an object such as {\"include_usage\": true}",
                  "stream_options")
    return stream, bool(opts.get("include_usage", False))


def model_field(body: dict, names: set[str], default: str) -> str:
    model = body.get("model")
    if model is None:
        return default
    if not isinstance(model, str):
        raise bad(f"model: expected a string, got {model!r}", "model")
    if model not in names:
        raise APIError(404, f"model {model!r} is not served here; this server serves "
                            f"{default!r} (GET /v1/models)", "model", "model_not_found")
    return model


def messages(body: dict) -> list[dict[str, str]]:
    """Chat messages with string content; text content parts are joined."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages: expected a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}]: expected an object with a string 'role'", "messages")
        out.append({"role": m["role"], "content": _content(m.get("content"), i)})
    return out


def _content(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content: only text parts are supported "
                          "({\"type\": \"text\", \"text\": ...})", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"messages[{i}].content: expected a string or a list of text parts", "messages")


def prompt(body: dict) -> str | list[int]:
    """A completion prompt: a string, a list of token ids, or a one-element list of either."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str) and p:
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                         for t in p):
        return p
    raise bad("prompt: expected a non-empty string or a list of token ids "
              "(one prompt per request)", "prompt")


# ---------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_body(rid: str, model: str, text: str, finish: str, use: dict, stats: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish}],
            "usage": use, "stats": stats}


def chat_chunk(rid: str, model: str, delta: dict | None, finish: str | None = None,
               use: dict | None = None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish}]
    d = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
         "model": model, "choices": choices}
    if use is not None:
        d["usage"] = use
    return d


def completion_body(rid: str, model: str, text: str, finish: str, use: dict,
                    stats: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": use, "stats": stats}


def completion_chunk(rid: str, model: str, text: str | None, finish: str | None = None,
                     use: dict | None = None) -> dict:
    choices = [] if text is None else [{"index": 0, "text": text, "logprobs": None,
                                        "finish_reason": finish}]
    d = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
         "choices": choices}
    if use is not None:
        d["usage"] = use
    return d


def sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()
