"""The `edge-readme` command line: a thin layer over the Python API."""

from __future__ import annotations

import json
import sys

import click

from .common import DEFAULT_MODEL, ProgressBars, engine_kwargs, friendly, load_engine, model_options
from .penalties import penalty_options, pop_penalties


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edge-readme")
def cli() -> None:
    """Run Read-ME mixture-of-experts LLMs under a hard memory budget."""


@cli.command()
@click.argument("name", required=False)
@click.option("--list", "list_", is_flag=True, help="List registry models.")
@click.option("--force", is_flag=True, help="Fetch or build again even if present.")
@friendly
def pull(name: str | None, list_: bool, force: bool) -> None:
    """Fetch a registry model into the local store and print its path."""
    from .. import registry

    if list_ or not name:
        for m in registry.list_models():
            mark = "*" if m["present"] else " "
            click.echo(f"{mark} {m['name']:<22} {m['description']}")
        return
    bars = ProgressBars(enabled=sys.stderr.isatty())
    try:
        path = registry.pull(name, force=force, progress=bars)
    finally:
        bars.close()
    click.echo(str(path))


@cli.command()
@click.argument("model", default=DEFAULT_MODEL)
@click.option("--json", "as_json", is_flag=True)
@friendly
def info(model: str, as_json: bool) -> None:
    """Architecture, parameter counts and bytes by part."""
    from ..inspect import describe
    from ..registry import resolve

    d = describe(resolve(model))
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    for k, v in d.items():
        if isinstance(v, dict):
            click.echo(f"{k}:")
            for k2, v2 in v.items():
                click.echo(f"  {k2:<24} {v2}")
        else:
            click.echo(f"{k:<26} {v}")


def _readable_plan(plan: dict) -> str:
    """The memory plan as aligned lines, sizes in MiB (the --json form has exact bytes)."""
    from ..budget import MIB

    lines = []
    for key, value in plan.items():
        label = key.replace("_", " ")
        if key.endswith("_bytes") and isinstance(value, int):
            label, value = label.removesuffix(" bytes"), f"{value / MIB:,.1f} MiB"
        lines.append(f"{label:<24} {value}")
    return "\n".join(lines)


@cli.command()
@click.argument("prompt")
@model_options
@click.option("--chat", is_flag=True, help="Apply the model's chat template.")
@click.option("--system", default=None, help="System message (with --chat).")
@click.option("--max-tokens", type=click.IntRange(1, 1 << 20), default=128, show_default=True)
@click.option("--temperature", type=click.FloatRange(0, 100), default=0.0, show_default=True)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0)
@click.option("--top-k", type=click.IntRange(0), default=0)
@click.option("--seed", type=int, default=None)
@click.option("--json", "as_json", is_flag=True, help="Print text, token_ids and stats as JSON.")
@click.option("--dry-run", is_flag=True, help="Print the memory plan and exit.")
@penalty_options
@friendly
def generate(prompt: str, model: str, chat: bool, system: str | None, max_tokens: int,
             temperature: float, top_p: float, top_k: int, seed: int | None, as_json: bool,
             dry_run: bool, **kw) -> None:
    """Complete PROMPT (raw completion; --chat for the chat template)."""
    from ..sampling import chat_penalties

    penalties = chat_penalties(temperature, **pop_penalties(kw))
    ekw = engine_kwargs(kw)
    if dry_run:
        from ..runtime import dry_run_plan

        plan = dry_run_plan(model, ekw)
        click.echo(json.dumps(plan) if as_json else _readable_plan(plan))
        return
    engine = load_engine(model, ekw, quiet=as_json)
    with engine:
        text = prompt
        if chat:
            msgs = ([{"role": "system", "content": system}] if system else [])
            text = engine.chat_prompt(msgs + [{"role": "user", "content": prompt}])
        stream = engine.stream(text, max_tokens=max_tokens, temperature=temperature,
                               top_p=top_p, top_k=top_k, seed=seed, **penalties)
        try:
            for chunk in stream:
                if not as_json and chunk.text:
                    click.echo(chunk.text, nl=False)
        except KeyboardInterrupt:
            stream.cancel()
            stream.collect()
        res = stream.result
        if as_json:
            click.echo(json.dumps({"text": res.text, "token_ids": res.token_ids,
                                   "finish_reason": res.finish_reason, "stats": res.stats}))
        else:
            click.echo()


def _register() -> None:
    from .chat import chat
    from .extra import register_extra
    from .refactor import eval_command, refactor_command
    from .serve import serve_command

    for command in (chat, serve_command, refactor_command, eval_command):
        cli.add_command(command)
    register_extra(cli)


_register()


def main() -> None:
    cli(prog_name="edge-readme")


if __name__ == "__main__":
    main()
