"""The Expert Router on the real models: SmolLM2-135M Read-ME (chat/prose) and Qwen2.5-Coder-0.5B
Read-ME (code) behind one endpoint under one memory budget that holds part of each model's
experts. A routed request gives exactly the tokens of its model alone with every expert resident
(temperature 0), and the prompts go where the router says."""

from __future__ import annotations

import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from edge_readme import Engine  # noqa: E402
from edge_readme.routing import build, fleet, spec_from  # noqa: E402
from edge_readme.server.routed import Fleet, create_routed_app  # noqa: E402
from tests.serving_util import background  # noqa: E402

pytestmark = [pytest.mark.real, pytest.mark.slow]

CHAT, CODER = "smollm2-135m-readme", "qwen2.5-coder-0.5b-readme"
OPTS = dict(device="cpu", context_length=512, max_batch=2)
PROMPTS = [("Write a Python function is_even(n) that returns True for even n.", CODER),
           ("Tell me a short story about a lighthouse keeper.", CHAT)]


@pytest.fixture(scope="module")
def served():
    needs = fleet.measure([CHAT, CODER], OPTS)
    room = sum(n.keys * n.slot_bytes for n in needs) // 2  # about half of all expert bytes
    budget = sum(n.minimum_bytes for n in needs) + room
    shares = fleet.split(budget, needs)
    slots = fleet.slots(shares, needs)
    assert all(1 < slots[n.name] < n.keys for n in needs)  # both really offload
    engines = {m: Engine.load(m, memory_budget=shares[m], **OPTS) for m in (CHAT, CODER)}
    f = Fleet.of(engines, build(spec_from([CHAT, CODER], "linear")))
    server = uvicorn.Server(uvicorn.Config(create_routed_app(f), host="127.0.0.1", port=0,
                                           log_level="warning"))
    try:
        with background(server) as port:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as http:
                yield http
    finally:
        f.close()


@pytest.mark.parametrize("prompt, model", PROMPTS)
def test_routed_real_model_gives_its_own_tokens(served, prompt, model):
    msgs = [{"role": "user", "content": prompt}]
    r = served.post("/v1/chat/completions", json={"model": "auto", "messages": msgs,
                                                  "max_tokens": 10, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.headers["x-edge-readme-model"] == model == r.json()["model"]
    with Engine.load(model, **OPTS) as alone:  # no budget: every expert resident
        want = alone.chat(msgs, max_tokens=10, temperature=0)
    assert r.json()["choices"][0]["message"]["content"] == want.text
    assert r.json()["usage"]["completion_tokens"] == len(want.token_ids)
