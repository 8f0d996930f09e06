"""`edge-readme chat`: a streaming, multi-turn terminal chat.

Ctrl-C stops the current reply and keeps the session; Ctrl-D or /exit quits. The KV cache is reused
across turns: the runtime keeps the longest common prefix of the last sequence.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

import click

from .common import engine_kwargs, friendly, load_engine, model_options
from .penalties import penalty_options, pop_penalties

HELP = "commands: /stats  /reset  /exit  (Ctrl-C stops a reply, Ctrl-D quits)"


def _footer(stats: dict[str, Any]) -> str:
    parts = [f"{stats.get('completion_tokens', 0)} tok",
             f"{stats.get('decode_tokens_per_s') or 0:.1f} tok/s"]
    cache = stats.get("cache")
    if cache and cache.get("hit_ratio") is not None:
        parts.append(f"hit {cache['hit_ratio']:.0%}")
        parts.append(f"read {cache.get('bytes_read', 0) / 2**20:.1f} MiB")
    mem = stats.get("memory", {})
    if mem:
        parts.append(f"mem {mem.get('resident_bytes', 0) / 2**20:.0f}/"
                     f"{mem.get('budget_bytes', 0) / 2**20:.0f} MiB")
    return "[" + " · ".join(parts) + "]"


def _stats_text(engine) -> str:
    s = engine.stats()
    lines = [f"decode {s.get('decode_tokens_per_s')} tok/s, prefill "
             f"{s.get('prefill_tokens_per_s')} tok/s"]
    cache = s.get("cache")
    if cache:
        lines.append(f"cache: hit ratio {cache.get('hit_ratio', 0):.1%}, hits {cache['hits']}, "
                     f"misses {cache['misses']}, prefetch hits {cache['prefetch_hits']}, "
                     f"read {cache['bytes_read'] / 2**20:.1f} MiB, stalled "
                     f"{cache['stall_seconds']:.2f} s")
        spec = s.get("speculation", {})
        if spec.get("guesses"):
            lines.append(f"speculative prefetch right {spec['right']}/{spec['guesses']}")
    m = s["memory"]
    lines.append(f"memory: {m['resident_bytes'] / 2**20:.1f} MiB resident of a "
                 f"{m['budget_bytes'] / 2**20:.1f} MiB budget ({m['slots']} expert slots)")
    return "\n".join(lines)


@click.command()
@model_options
@click.option("--system", default=None, help="System message.")
@click.option("--max-tokens", type=click.IntRange(1), default=512, show_default=True)
@click.option("--temperature", type=click.FloatRange(0, 100), default=0.7, show_default=True)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.9)
@click.option("--seed", type=int, default=None)
@click.option("--quiet", "-q", is_flag=True, help="No stats footer after replies.")
@penalty_options
@friendly
def chat(model: str, system: str | None, max_tokens: int, temperature: float, top_p: float,
         seed: int | None, quiet: bool, **kw) -> None:
    """Chat with a model in the terminal (default: the Read-ME SmolLM2)."""
    from ..sampling import chat_penalties

    penalties = chat_penalties(temperature, **pop_penalties(kw))
    engine = load_engine(model, engine_kwargs(kw))
    base = [{"role": "system", "content": system}] if system else []
    history: list[dict[str, str]] = list(base)
    click.echo(f"edge-readme chat · {model} · {HELP}", err=True)
    with engine:
        while True:
            try:
                line = input("> " if sys.stdin.isatty() else "")
            except EOFError:  # Ctrl-D: end the chat's line so the shell prompt starts clean
                if sys.stdin.isatty():
                    click.echo()
                break
            except KeyboardInterrupt:
                click.echo()
                continue
            cmd = line.strip()
            if not cmd:
                continue
            if cmd in ("/exit", "/quit"):
                break
            if cmd == "/reset":
                history = list(base)
                click.echo("(history cleared)", err=True)
                continue
            if cmd == "/stats":
                click.echo(_stats_text(engine))
                continue
            if cmd.startswith("/"):
                click.echo(f"unknown command {cmd}; {HELP}", err=True)
                continue
            history.append({"role": "user", "content": line})
            reply, stats = _reply(engine, history, max_tokens, temperature, top_p, seed,
                                  penalties)
            history.append({"role": "assistant", "content": reply})
            if not quiet and stats:
                click.echo(_footer(stats), err=True)


def _reply(engine, history, max_tokens, temperature, top_p, seed,
           penalties=None) -> tuple[str, dict]:
    stream = engine.chat_stream(history, max_tokens=max_tokens, temperature=temperature,
                                top_p=top_p, seed=seed, **(penalties or {}))
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, lambda *_: stream.cancel())  # Ctrl-C ends this reply only
    try:
        for chunk in stream:
            if chunk.text:
                click.echo(chunk.text, nl=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    click.echo()
    res = stream.result
    if res.finish_reason == "cancelled":
        click.echo("(stopped)", err=True)
    return res.text, res.stats
