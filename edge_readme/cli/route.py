"""`serve --route` / `--route-file`: several models behind one endpoint under one budget."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ..budget import auto_budget, format_bytes
from ..errors import EdgeReadmeError
from .common import DEFAULT_MODEL, ProgressBars


def fleet_shares(models: list[str], options: dict) -> tuple[int | None, list, dict[str, int]]:
    """(budget, needs, bytes per model) of one --memory-budget split across the models."""
    from ..routing import fleet
    from ..runtime import pick_device

    budget = options.get("memory_budget")
    if budget is None:
        return None, [], {}
    if budget == "auto":
        budget = auto_budget(pick_device(options.get("device", "auto")))
    needs = fleet.measure(models, options)
    return budget, needs, fleet.split(budget, needs)


def print_plans(models: list[str], route: dict | None, options: dict, as_json: bool) -> None:
    from ..runtime import dry_run_plan

    if route is None:  # one model, its own plan: what `generate --dry-run` shows
        budget, needs, shares = options.get("memory_budget"), [], {}
        plans = {m: dry_run_plan(m, options) for m in models}
        budget = plans[models[0]]["budget_bytes"] if budget is not None else None
    else:
        budget, needs, shares = fleet_shares(models, options)
        plans = {m: dry_run_plan(m, {**options, "memory_budget": shares[m]})
                 if budget is not None else dry_run_plan(m, options) for m in models}
    total = sum(p["budget_bytes"] for p in plans.values())
    out = {"budget_bytes": budget, "planned_bytes": total,
           "minimum_bytes": sum(n.minimum_bytes for n in needs) if needs else
           sum(p["minimum_bytes"] for p in plans.values()),
           "route": route, "models": plans}
    if as_json:
        click.echo(json.dumps(out))
        return
    cap = format_bytes(budget) if budget is not None else "none (all resident)"
    click.echo(f"memory budget {cap}; planned {format_bytes(total)}; minimum "
               f"{format_bytes(out['minimum_bytes'])}")
    for m, p in plans.items():
        click.echo(f"  {m}: {format_bytes(p['budget_bytes'])} = dense "
                   f"{format_bytes(p['dense_bytes'])} + KV {format_bytes(p['kv_cache_bytes'])} "
                   f"+ scratch {format_bytes(p['scratch_bytes'])} + {p['slots']} of "
                   f"{p['expert_keys']} expert slots x {format_bytes(p['slot_bytes'])}")
    if route is not None:
        click.echo(f"  route: {route['kind']}, " + ", ".join(f"{lab} -> {m}" for lab, m
                                                             in route["table"].items()))


def serve_routed_command(models: list[str], route: str | None, route_file: str | None,
                         options: dict, limits, dry_run: bool, as_json: bool, host: str,
                         port: int, api_key: str | None, log_level: str,
                         rebalance_every: float = 1.0) -> None:
    from ..routing import read_route_file, spec_from

    if route_file is not None:
        if models != [DEFAULT_MODEL] or route is not None:
            raise EdgeReadmeError("--route-file names the models and the router; pass it "
                                  "without -m and --route")
        spec = read_route_file(route_file)
    else:
        spec = spec_from(models, route or "auto")
    names = list(spec.models)
    route_info = {"kind": spec.kind, "table": spec.table}
    if dry_run:
        return print_plans(names, route_info, options, as_json)
    from ..server.routed import Fleet, serve_routed

    budget, needs, shares = fleet_shares(names, options)
    fleet = Fleet(names, budget=budget, needs=needs, shares=shares,
                  rebalance_every=rebalance_every)

    def load(name: str, progress):
        from ..engine import Engine

        bars = ProgressBars(enabled=sys.stderr.isatty())

        def both(stage: str, frac: float) -> None:
            progress(stage, frac)
            bars(stage, frac)

        kw: dict[str, Any] = dict(options)
        if budget is not None:
            kw["memory_budget"] = shares[name]
        try:
            return Engine.load(name, on_progress=both, **kw)
        finally:
            bars.close()

    click.echo(f"serving {', '.join(names)} behind model \"auto\" ({spec.kind} router) at "
               f"http://{host}:{port}/v1 (GET /health shows loading)", err=True)
    serve_routed(fleet, load, lambda f: make_router(spec, f), host=host, port=port,
                 api_key=api_key, limits=limits, log_level=log_level)


def make_router(spec, fleet):
    """The spec's PromptRouter; the readme kind reads the loaded engine's own router."""
    from ..routing import DOMAINS, build
    from ..routing.readme_domains import ReadmeDomainRouter

    def readme_source(name: str):
        eng = fleet.holders[name].engine
        moe = eng.runtime.config.moe
        if eng.runtime.router is None or moe is None:
            raise EdgeReadmeError(f"--route readme: {name} is a dense model with no router; "
                                  "set readme_model to a Read-ME (-readme) model")
        return ReadmeDomainRouter(eng.runtime.router, eng.tokenizer.encode, moe.domains,
                                  DOMAINS, spec.domain_labels)

    return build(spec, readme_source)
