"""The Expert Router server: several models behind one OpenAI-compatible endpoint.

`model: "auto"` is routed per prompt by a `routing.PromptRouter`; a request naming a served
model goes to it; any other name is a 404. The chosen model is the response's `model` field and
its `x-edge-readme-model` header (`x-edge-readme-route` gives the router's label and
`x-edge-readme-route-ms` its time). GET /v1/models lists `auto` and every model; GET /health
reports each model's load and traffic, and the memory split (now, and as queued traffic would
set it). Completions run through `app.respond`, as on the single-model server, so a routed
request gets exactly the tokens its model gives alone. This module knows HTTP and model names.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from ..engine import Engine
from ..errors import EdgeReadmeError
from ..routing import fleet
from ..routing.policy import PromptRouter
from . import protocol as P
from .app import (
    EngineHolder,
    _read_body,
    _server,
    base_app,
    check_port,
    refuse_when_full,
    respond,
    settle_heap,
)
from .protocol import APIError, Limits

AUTO = "auto"
MAX_ROUTE_CHARS = 4000  # the router reads the head of a long prompt


@dataclass
class Fleet:
    """The served models in order, each behind an EngineHolder, the router, and the budget."""

    names: list[str]
    holders: dict[str, EngineHolder] = field(default_factory=dict)
    router: PromptRouter | None = None
    router_error: BaseException | None = None
    budget: int | None = None
    needs: list[fleet.ModelNeeds] = field(default_factory=list)
    shares: dict[str, int] = field(default_factory=dict)
    rebalance_every: float = 0.0  # seconds between traffic checks; 0: the split stays fixed
    rebalancer: fleet.Rebalancer | None = None

    def __post_init__(self) -> None:
        for n in self.names:
            self.holders.setdefault(n, EngineHolder())

    @classmethod
    def of(cls, engines: dict[str, Engine], router: PromptRouter | None) -> "Fleet":
        return cls(list(engines), {n: EngineHolder(e) for n, e in engines.items()}, router)

    def start_rebalancing(self) -> None:
        """Once every engine is loaded: move expert slots to the models with traffic."""
        if self.budget is None or not self.needs or self.rebalance_every <= 0:
            return
        if any(h.engine is not None and h.engine.runtime.device.type != "cpu"
               for h in self.holders.values()):
            return  # a CUDA cache's slot block is real device memory: the start split stays
        self.rebalancer = fleet.Rebalancer(
            self.budget, self.needs, self.shares,
            inflight=lambda: {n: h.inflight for n, h in self.holders.items()},
            apply=lambda n, b: self.holders[n].engine.set_memory_budget(b),
            every_s=self.rebalance_every)
        self.rebalancer.start()

    def close(self) -> None:
        if self.rebalancer is not None:
            self.rebalancer.stop()
        for h in self.holders.values():
            if h.engine is not None:
                h.engine.close()

    def memory(self) -> dict[str, Any] | None:
        if self.budget is None or not self.needs:
            return None
        queued = {n: h.inflight for n, h in self.holders.items()}
        follow = fleet.by_queue(self.budget, self.needs, queued)
        r = self.rebalancer
        return {"budget_bytes": self.budget, "shares_bytes": dict(self.shares),
                "expert_slots": fleet.slots(self.shares, self.needs),
                "rebalance": None if r is None else {
                    "every_s": r.every_s, "idle_s": r.idle_s, "moves": r.moves,
                    "last_error": None if r.last_error is None else str(r.last_error)},
                "by_queue": {"queued": queued, "shares_bytes": follow,
                             "expert_slots": fleet.slots(follow, self.needs)}}


def route_text(body: dict, chat: bool) -> str | None:
    """What the router reads: the user turns of a chat, or a completion's prompt string."""
    if chat:
        msgs = P.messages(body)
        users = [m["content"] for m in msgs if m["role"] == "user"] or \
            [m["content"] for m in msgs]
        text = "\n".join(users)
    else:
        p = P.prompt(body)
        if not isinstance(p, str):
            return None  # token ids: no text to classify
        text = p
    return text[-MAX_ROUTE_CHARS:]


def create_routed_app(models: Fleet, api_key: str | None = None, limits: Limits = Limits()):
    from starlette.responses import JSONResponse

    app, authorize = base_app(api_key)
    app.state.fleet, app.state.limits = models, limits

    async def health(request):
        per = {}
        for n, h in models.holders.items():
            per[n] = {"status": "ok" if h.engine else "failed" if h.error else "loading",
                      "progress": {"stage": h.stage, "fraction": round(h.fraction, 4)},
                      "inflight": h.inflight, "served": dict(h.served)}
            if h.error is not None:
                per[n]["error"] = str(h.error)
        failed = any(h.error for h in models.holders.values()) or models.router_error
        ready = all(h.engine for h in models.holders.values()) and models.router is not None
        body = {"status": "ok" if ready else "failed" if failed else "loading",
                "model": AUTO, "models": per,
                "router": models.router.kind if models.router else None}
        if models.router_error is not None:
            body["router_error"] = str(models.router_error)
        mem = models.memory()
        if mem is not None:
            body["memory"] = mem
        return JSONResponse(body, status_code=200 if ready else 503)

    async def list_models(request):
        authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "edge-readme"}
            for n in [AUTO, *models.names]]})

    def choose(body: dict, chat: bool) -> tuple[str, dict[str, str], dict]:
        asked = body.get("model", AUTO)
        if asked is None:
            asked = AUTO
        if not isinstance(asked, str):
            raise P.bad(f"model: expected a string, got {asked!r}", "model")
        if asked != AUTO:
            if asked not in models.holders:
                raise APIError(404, f"model {asked!r} is not served here; this server serves "
                                    f"{', '.join([AUTO, *models.names])} (GET /v1/models)",
                               "model", "model_not_found")
            return asked, {}, {}
        if models.router is None:
            why = f"failed: {models.router_error}" if models.router_error else "is not ready"
            raise APIError(503, f"the prompt router {why}; name a model, or retry when GET "
                                "/health says ready", code="router_loading",
                           type="server_error")
        text = route_text(body, chat)
        if text is None:  # token ids: the chat/prose model
            name, label, seconds = models.router.table["chat"], "chat", 0.0
        else:
            d = models.router.choose(text)
            name, label, seconds = d.model, d.label, d.seconds
        route = {"kind": models.router.kind, "label": label, "seconds": round(seconds, 6)}
        return name, {"x-edge-readme-route": f"{models.router.kind}:{label}",
                      "x-edge-readme-route-ms": f"{seconds * 1e3:.3f}"}, {"route": route}

    async def complete(request):
        chat = request.scope["path"].endswith("/chat/completions")
        authorize(request)
        body = await _read_body(request, limits.max_body_bytes)
        if models.router is not None:  # every queue full: 429 before parsing and routing
            full = refuse_when_full([h.engine for h in models.holders.values()])
            if full is not None:
                return full
        body = P.parse_json(body)
        name, headers, extra = choose(body, chat)
        holder = models.holders[name]
        eng = holder.ready()
        headers["x-edge-readme-model"] = name
        return await respond(request, body, chat, eng, holder, name, limits, headers, extra)

    app.add_route("/health", health, methods=["GET"])
    app.add_route("/v1/models", list_models, methods=["GET"])
    app.add_route("/v1/chat/completions", complete, methods=["POST"])
    app.add_route("/v1/completions", complete, methods=["POST"])
    return app


def load_fleet(models: Fleet, load: Callable[[str, Callable[[str, float], None]], Engine],
               make_router: Callable[[Fleet], PromptRouter],
               on_failure: Callable[[], None] = lambda: None,
               on_ready: Callable[[], None] = lambda: None) -> threading.Thread:
    """Load each model in turn in a daemon thread (its holder shows progress), then build the
    router (the readme kind reads a loaded engine's router), then call `on_ready()`. A failure
    stops the loading."""

    def run() -> None:
        for n in models.names:
            h = models.holders[n]

            def progress(stage: str, frac: float, h: EngineHolder = h) -> None:
                h.stage, h.fraction = stage, float(frac)

            try:
                h.engine = load(n, progress)
                h.stage, h.fraction = "ready", 1.0
            except BaseException as e:  # reported on /health and re-raised by serve_routed
                h.error, h.stage = e, "failed"
                on_failure()
                return
        try:
            models.router = make_router(models)
        except BaseException as e:
            models.router_error = e
            on_failure()
            return
        models.start_rebalancing()
        on_ready()

    t = threading.Thread(target=run, name="edge-readme-load", daemon=True)
    t.start()
    return t


def serve_routed(models: Fleet, load, make_router, host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, limits: Limits = Limits(),
                 log_level: str = "info") -> None:
    """Listen at once, load the models in the background, serve until Ctrl-C; close them all."""
    check_port(host, port)
    server = _server(create_routed_app(models, api_key, limits), host, port, log_level)
    load_fleet(models, load, make_router, on_failure=lambda: setattr(server, "should_exit", True),
               on_ready=settle_heap)
    try:
        server.run()
    finally:
        models.close()
    errors = [h.error for h in models.holders.values() if h.error is not None]
    if errors:
        raise errors[0]
    if models.router_error is not None:
        err = models.router_error
        raise err if isinstance(err, EdgeReadmeError) else EdgeReadmeError(str(err))
