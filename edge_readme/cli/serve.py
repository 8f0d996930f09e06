"""`edge-readme serve`: the local OpenAI-compatible server (needs the `serve` extra)."""

from __future__ import annotations

import sys
from typing import Any

import click

from .common import ProgressBars, engine_kwargs, friendly, model_options

LOOPBACK = ("127.0.0.1", "localhost", "::1")
SCHEDULES = ["fcfs", "decode-first", "prefill-first", "expert-aware"]


@click.command("serve")
@model_options(several=True)
@click.option("--route", type=click.Choice(["auto", "linear", "kmeans", "readme", "random"]),
              default=None, help="Serve every -m behind one endpoint; model \"auto\" is routed "
              "per prompt by this router (auto = linear: TF-IDF softmax regression).")
@click.option("--route-file", type=click.Path(dir_okay=False), default=None,
              help="JSON or TOML route file: models, route, table, readme_model, seed.")
@click.option("--rebalance-every", type=click.FloatRange(0), default=1.0, show_default=True,
              help="With several models under one --memory-budget: seconds between moves of "
                   "expert slots to the models with traffic (0: keep the split fixed).")
@click.option("--dry-run", is_flag=True, help="Print the memory plan (per model) and exit.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print it as JSON.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback is reachable from the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="EDGE_README_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' (also from $EDGE_README_API_KEY).")
@click.option("--max-prompt-tokens", type=click.IntRange(1), default=None,
              help="Longest prompt a request may send [default: context length - 1].")
@click.option("--max-tokens-limit", type=click.IntRange(1), default=2048, show_default=True,
              help="Largest max_tokens a request may ask for.")
@click.option("--max-body-bytes", type=click.IntRange(1), default=1 << 20, show_default=True,
              help="Largest request body; larger ones get 413.")
@click.option("--max-batch", type=click.IntRange(1, 256), default=4, show_default=True,
              help="Sequences decoded together; each holds a KV cache in the memory budget.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default="decode-first",
              show_default=True, help="How each step's batch is chosen (expert-aware: Read-ME).")
@click.option("--max-queue", type=click.IntRange(0), default=None,
              help="Requests waiting for a slot before 429 [default: 4 x --max-batch].")
@click.option("--exact", is_flag=True,
              help="One forward pass per request: tokens exactly as each request alone.")
@click.option("--request-timeout", type=click.FloatRange(0, min_open=True), default=None,
              help="Cancel a request still running this many seconds after it arrived (504).")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              default="info", show_default=True)
@friendly
def serve_command(model: tuple[str, ...], host: str, port: int, api_key: str | None,
                  max_prompt_tokens: int | None, max_tokens_limit: int, max_body_bytes: int,
                  max_batch: int, schedule: str, max_queue: int | None, exact: bool,
                  log_level: str, request_timeout: float | None = None, route: str | None = None,
                  route_file: str | None = None, dry_run: bool = False, as_json: bool = False,
                  rebalance_every: float = 1.0, **kw: Any) -> None:
    """Serve /v1/chat/completions, /v1/completions, /v1/models and /health.

    The server listens at once and loads the model in the background; GET /health shows
    the load progress and answers 200 when requests can be served. With --route (or
    --route-file) every model shares one --memory-budget behind one endpoint."""
    from ..server.app import _require, check_api_key, default_model_name, serve_loading
    from ..server.protocol import Limits

    _require("starlette"), _require("uvicorn")  # fail before loading anything
    if api_key is not None:
        check_api_key(api_key)
    options = engine_kwargs(kw)
    options.update(max_batch=max_batch, schedule=schedule, exact=exact,
                   max_queue=4 * max_batch if max_queue is None else max_queue)
    limits = Limits(max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens_limit,
                    default_max_tokens=min(512, max_tokens_limit), max_body_bytes=max_body_bytes,
                    request_timeout=request_timeout)
    if route or route_file or len(model) > 1:
        from .route import serve_routed_command

        return serve_routed_command(list(model), route, route_file, options, limits, dry_run,
                                    as_json, host, port, api_key, log_level,
                                    rebalance_every=rebalance_every)
    model = model[0]
    if dry_run:
        from .route import print_plans

        return print_plans([model], None, options, as_json)
    name = default_model_name(model)
    if host not in LOOPBACK and api_key is None:
        click.echo(f"warning: listening on {host} without --api-key; anyone who can reach "
                   "this port can use the model", err=True)

    def load(progress):
        from ..engine import Engine

        bars = ProgressBars(enabled=sys.stderr.isatty())

        def both(stage: str, frac: float) -> None:
            progress(stage, frac)
            bars(stage, frac)

        try:
            return Engine.load(model, on_progress=both, **options)
        finally:
            bars.close()

    click.echo(f"serving {name} at http://{host}:{port}/v1 (GET /health shows loading)", err=True)
    serve_loading(load, name, host=host, port=port, api_key=api_key, limits=limits,
                  log_level=log_level)
