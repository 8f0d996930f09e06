"""Batching on the real default models: at temperature 0, each request's tokens in a batch of
concurrent requests equal its tokens alone (dense GGUF and the Read-ME MoE)."""

from __future__ import annotations

import pytest

from edge_readme import Engine, registry

pytestmark = [pytest.mark.real, pytest.mark.slow]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "To be, or not to be,",
           "Once upon a time", "Dear Sir or Madam,"]


@pytest.mark.parametrize("name,schedule", [("smollm2-135m", "decode-first"),
                                           ("smollm2-135m-readme", "decode-first"),
                                           ("smollm2-135m-readme", "expert-aware")])
def test_batched_requests_get_their_solo_tokens(name, schedule):
    path = str(registry.pull(name))
    with Engine.load(path, device="cpu", context_length=256) as e:
        solo = {p: e.generate(p, max_tokens=12).token_ids for p in PROMPTS}
    with Engine.load(path, device="cpu", context_length=256, max_batch=4,
                     schedule=schedule) as e:
        streams = {p: e.stream(p, max_tokens=12) for p in PROMPTS}
        got = {p: s.collect().token_ids for p, s in streams.items()}
        assert max(n for n, _, _ in e.step_log) > 1
    assert got == solo
