"""End to end: the default MoE rebuilt from the real GGUF plus the shipped artifacts.

Runs where the real model can be had (CI pulls it into the store); marked real + slow.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

import pytest
from safetensors import safe_open

from edge_readme import Engine, registry
from edge_readme.errors import ModelFormatError
from edge_readme.experts_format import read_manifest
from edge_readme.loader import load_model
from edge_readme.refactor.build_default import META, build_default

pytestmark = [pytest.mark.real, pytest.mark.slow]

ARTIFACTS = Path(str(resources.files("edge_readme") / "artifacts"))
BUDGET_S = 5 * 60  # the bound for the pull-time recovery on a 2-core CPU


@pytest.fixture(scope="module")
def gguf():
    return registry.pull("smollm2-135m")


def test_artifacts_are_small_and_tied_to_the_gguf(gguf):
    meta = json.loads((ARTIFACTS / META).read_text())
    assert meta["gguf_sha256"] == registry.REGISTRY["smollm2-135m"].sha256
    assert sum(p.stat().st_size for p in ARTIFACTS.iterdir()) < 8 << 20


def test_build_default_makes_a_working_moe(gguf, tmp_path):
    calls = []
    t = time.monotonic()
    out = build_default(gguf, tmp_path / "moe", progress=lambda s, f: calls.append((s, f)))
    took = time.monotonic() - t
    assert took < 2 * BUDGET_S, f"build took {took:.0f} s"  # slack for a loaded CI machine
    assert calls and calls[-1] == ("refit", 1.0)
    loaded = load_model(out)
    meta = json.loads((ARTIFACTS / META).read_text())
    prov = json.loads((out / "refactor.json").read_text())
    assert prov["artifacts_sha256"] == registry.artifacts_digest()  # what makes a build current
    assert loaded.config.moe.num_experts == meta["moe"]["num_experts"]
    assert read_manifest(out).num_experts == loaded.config.moe.num_experts
    with safe_open(str(out / "experts.safetensors"), framework="pt") as f:
        assert len(list(f.keys())) >= loaded.config.num_layers
    with Engine.load(str(out), device="cpu", context_length=128) as e:
        r = e.generate("The capital of France is", max_tokens=8)
    assert len(r.token_ids) == 8 and r.text.strip()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_build_default_refuses_another_gguf(tmp_path):
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(ModelFormatError, match="sha256"):
        build_default(other, tmp_path / "moe", progress=False)
    assert not (tmp_path / "moe").exists()
