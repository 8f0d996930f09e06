"""Chat templates rendered in jinja2's immutable sandbox with a time and an output bound.

The sandbox already blocks Python internals; this module also bounds CPU and memory, so a
hostile template in a model file cannot hang a server worker or abort the process:
- sizes are checked before they are built: `'x' * n`, `n ** m`, `'%0999999999d' % 1`,
  `range(n)`, filters and methods given huge counts or widths;
- the output is collected chunk by chunk and refused past `OUTPUT_CAP` characters;
- a render still running at its deadline gets `TemplateTimeout` raised inside it (CPython's
  PyThreadState_SetAsyncExc), which stops pure-Python loops such as nested `range` loops;
- every exception a template raises becomes a `RequestError` (400 at the server).
It knows nothing about tokens or messages' meaning.
"""

from __future__ import annotations

import ctypes
import functools
import re
import threading
from typing import Any

from .errors import RequestError

OUTPUT_CAP = 1 << 20  # characters of rendered prompt
RENDER_SECONDS = 2.0
TEMPLATE_CAP = 1 << 20  # characters of template source
_BIG = 1 << 20  # the largest count or width a template may pass to anything
MAX_RANGE = 100_000  # as jinja's own sandbox
_WIDE_FORMAT = re.compile(r"\d{7,}")


class TemplateTimeout(Exception):
    """Raised inside a render that ran past its deadline."""


def _refuse(what: str) -> RequestError:
    return RequestError(f"the model's chat template asked for {what}; refused (limit "
                        f"{_BIG:,}). Use raw completion or fix tokenizer.chat_template")


def _check_args(args: tuple, kwargs: dict) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > _BIG:
            raise _refuse(f"a count or width of {a}")
        if isinstance(a, float) and abs(a) > _BIG:
            raise _refuse(f"a count or width of {a:g}")
        if isinstance(a, str) and len(a) > OUTPUT_CAP:
            raise _refuse(f"a string of {len(a)} characters")


def _bounded_filter(f):
    @functools.wraps(f)  # keeps jinja's pass_context / pass_environment markers
    def run(*args, **kwargs):
        _check_args(args[1:] if getattr(f, "jinja_pass_arg", None) else args, kwargs)
        out = f(*args, **kwargs)
        if isinstance(out, (str, list)) and len(out) > OUTPUT_CAP:
            raise _refuse(f"a filter result of {len(out)} items")
        return out
    return run


def _bounded_range(*args):
    _check_args(args, {})
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise _refuse(f"a range of {len(r)} items (at most {MAX_RANGE})")
    return r


def environment():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%", "+"})

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise _refuse(f"a power of {right}")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) \
                            and len(seq) * n > OUTPUT_CAP:
                        raise _refuse(f"a sequence of {len(seq) * n} items")
            if operator == "%" and isinstance(left, str) and _WIDE_FORMAT.search(left):
                raise _refuse("a format width of 7 digits or more")
            if operator == "+" and isinstance(left, (str, list)) \
                    and isinstance(right, (str, list)) and len(left) + len(right) > OUTPUT_CAP:
                raise _refuse(f"a sequence of {len(left) + len(right)} items")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
            _check_args(args, kwargs)
            return super().call(__context, __obj, *args, **kwargs)

        def getattr(self, obj, attribute):
            if attribute in ("format", "format_map") and isinstance(obj, str) \
                    and _WIDE_FORMAT.search(obj):
                raise _refuse("a format width of 7 digits or more")
            return super().getattr(obj, attribute)

    env = Bounded(trim_blocks=True, lstrip_blocks=True)
    env.globals.pop("lipsum", None)
    env.globals["range"] = _bounded_range
    env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
    return env


def compile_template(source: str, raise_exception) -> Any:
    if len(source) > TEMPLATE_CAP:
        raise RequestError(f"the model's chat template is {len(source)} characters; at most "
                           f"{TEMPLATE_CAP} are rendered. Use raw completion")
    env = environment()
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except Exception as e:  # noqa: BLE001 - a syntax error, or recursion in the parser
        raise RequestError(f"the model's chat template does not compile: {type(e).__name__}: "
                           f"{e}; use raw completion or fix tokenizer.chat_template") from None


def render(template: Any, seconds: float = RENDER_SECONDS, **variables: Any) -> str:
    """The rendered text, or RequestError: on any template exception, past `seconds`, or past
    OUTPUT_CAP characters."""
    timer = _Interrupt(seconds)
    try:
        out, size = [], 0
        with timer:
            for piece in template.generate(**variables):
                size += len(piece)
                if size > OUTPUT_CAP:
                    raise _refuse(f"more than {OUTPUT_CAP} characters of output")
                out.append(piece)
        return "".join(out)
    except RequestError:
        raise
    except TemplateTimeout:
        raise RequestError(f"the model's chat template ran past {seconds:g} s and was stopped; "
                           "use raw completion or fix tokenizer.chat_template") from None
    except Exception as e:  # noqa: BLE001 - every template failure is the request's 400
        raise RequestError(f"the model's chat template failed in the sandbox: "
                           f"{type(e).__name__}: {e}; use raw completion or fix "
                           "tokenizer.chat_template") from None


class _Interrupt:
    """Raises TemplateTimeout in the entering thread if the block runs past `seconds`."""

    def __init__(self, seconds: float):
        self.seconds, self.lock, self.active = seconds, threading.Lock(), False

    def __enter__(self) -> "_Interrupt":
        self.thread_id = threading.get_ident()
        self.active = True
        self.timer = threading.Timer(self.seconds, self._fire)
        self.timer.daemon = True
        self.timer.start()
        return self

    def _fire(self) -> None:
        with self.lock:
            if self.active:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(self.thread_id), ctypes.py_object(TemplateTimeout))

    def __exit__(self, *exc: Any) -> None:
        with self.lock:
            fired, self.active = self.timer.finished.is_set(), False
        self.timer.cancel()
        if fired:  # clear a timeout that fired but was not raised yet (NULL clears)
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.thread_id), None)
