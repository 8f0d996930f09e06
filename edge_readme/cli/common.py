"""Shared CLI plumbing: error handling, progress bars, and the options every model command takes."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import click

from ..errors import EdgeReadmeError

DEFAULT_MODEL = "smollm2-135m-readme"


class UserError(click.ClickException):
    """A one-line error, exit code 2, no traceback."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def friendly(fn: Callable) -> Callable:
    """Turn library errors into one-line CLI errors (exit 2) and Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EdgeReadmeError as e:
            raise UserError(str(e)) from None
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)
        except OSError as e:
            raise UserError(f"{e.filename or ''}: {e.strerror or e}".lstrip(": ")) from None

    return wrapper


class ProgressBars:
    """tqdm bars with ETA, one per stage, fed by `(stage, fraction)` callbacks."""

    LABELS = {"extract": "extract model", "verify": "verify sha256", "read": "read weights",
              "weights": "load weights", "experts": "load experts"}

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, frac: float) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=1000, desc=self.LABELS.get(stage, stage),
                                          unit="‰", leave=False, file=sys.stderr,
                                          bar_format="{desc}: {percentage:3.0f}%|{bar}| "
                                                     "[{elapsed}<{remaining}]")
        bar.n = int(min(max(frac, 0.0), 1.0) * 1000)
        bar.refresh()
        if frac >= 1.0:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


MISS_PRECISION = click.option(
    "--miss-precision", type=click.Choice(["q2", "q3", "q4"]), default=None,
    help="On an expert miss in decode, compute with a resident low-bit copy of the expert "
         "instead of waiting for its load (HOBBIT). Faster under tight budgets; output may "
         "differ from all-resident. Off by default.")


def model_options(fn: Callable | None = None, *, several: bool = False) -> Callable:
    """The options every model command takes; `several`: -m may be repeated (serve --route)."""
    if fn is None:
        return functools.partial(model_options, several=several)
    model = (click.option("--model", "-m", multiple=True, default=[DEFAULT_MODEL],
                          show_default=True, help="Registry name, .gguf file or model folder; "
                          "repeat it to serve several behind --route.") if several else
             click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
                          help="Registry name, .gguf file or model folder."))
    opts = [
        model,
        click.option("--memory-budget", default=None,
                     help="Hard cap on device memory: 512MiB, 1.5GiB, 800MB, bytes, or auto."),
        click.option("--policy", type=click.Choice(["belady", "lru", "lfu", "fifo"]),
                     default="belady", show_default=True, help="Expert cache eviction policy."),
        click.option("--device", default="auto", show_default=True,
                     help="auto, cpu, cuda, cuda:N or mps."),
        click.option("--weights", type=click.Choice(["q4", "q8", "bf16", "f16", "f32"]),
                     default=None,
                     help="Weight format, held and computed: q4 (int4 group-wise; default on "
                          "CPU), q8 (int8, CPU), bf16, f16 (default on GPU) or f32."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
                     default=None, help="Older spelling of the float --weights formats."),
        click.option("--quantize", type=click.Choice(["int8"]), default=None,
                     help="Older spelling of --weights q8."),
        click.option("--threads", type=click.IntRange(1, 256), default=None,
                     help="CPU threads for compute."),
        click.option("--context-length", type=click.IntRange(16, 1 << 20), default=2048,
                     show_default=True, help="KV cache length (counts against the budget)."),
        click.option("--no-prefetch", is_flag=True, help="Load experts on demand only."),
        click.option("--verify", is_flag=True, help="Check each expert's sha256 when read."),
        click.option("--cold", is_flag=True,
                     help="Keep expert reads out of the OS page cache (measure real storage)."),
        MISS_PRECISION,
        click.option("--embeddings", type=click.Choice(["file", "memory"]), default="file",
                     show_default=True,
                     help="file: read lookup-only tables (a token embedding with a separate "
                          "output head, the router's embedding) by row from the model file, "
                          "outside the budget; memory: hold them. Same answers either way."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def engine_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    out = {k: kw.pop(k) for k in ("memory_budget", "policy", "device", "weights", "dtype",
                                  "threads", "context_length", "verify", "cold", "quantize",
                                  "miss_precision", "embeddings")}
    out["prefetch"] = not kw.pop("no_prefetch")
    if out["memory_budget"] is not None:
        from ..budget import parse_budget

        parsed = parse_budget(out["memory_budget"])
        out["memory_budget"] = "auto" if parsed is None else parsed
    return out


def load_engine(model: str, kw: dict[str, Any], quiet: bool = False):
    from ..engine import Engine

    bars = ProgressBars(enabled=not quiet and sys.stderr.isatty())
    try:
        return Engine.load(model, on_progress=bars, **kw)
    finally:
        bars.close()
