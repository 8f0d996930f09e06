"""Low-rank trained recovery (delta.py): training, merging, the shipped file, bad files."""

import pytest
import torch
from safetensors.torch import load_file

from edge_readme.errors import DataError, ModelFormatError
from edge_readme.loader import load_model
from edge_readme.refactor import build_default
from edge_readme.refactor import functional as fn
from edge_readme.refactor.build_default import DELTAS, ROUTER, export_artifacts
from edge_readme.refactor.delta import FOLDER_DELTAS, Deltas, size_bytes
from tests.test_refactor import run, tiny  # noqa: F401  (the module fixture)


def _layers(rows=(5, 3), d=8, experts=2, seed=0):
    g = torch.Generator().manual_seed(seed)

    def w(r):
        return tuple(torch.randn(r, d, generator=g) for _ in range(3))
    return [fn.MoELayer(w(rows[0]), [w(rows[1]) for _ in range(experts)]) for _ in range(2)]


def test_deltas_start_at_zero_and_merge_what_apply_computes():
    layers = _layers()
    d = Deltas.create(layers, 2)
    same = d.apply(layers)
    assert all(torch.equal(a, b) for x, y in zip(layers, same)
               for a, b in zip(x.parameters(), y.parameters()))
    for p in d.parameters():
        p.data.normal_()
    applied = [w.detach().clone() for x in d.apply(layers) for w in x.parameters()]
    before = [w.clone() for x in layers for w in x.parameters()]
    d.merge_into(layers)
    merged = [w for x in layers for w in x.parameters()]
    assert all(torch.allclose(a, m) for a, m in zip(applied, merged))
    assert not all(torch.equal(a, b) for a, b in zip(before, merged))
    assert d.num_parameters() * 2 == size_bytes(layers, 2)


def test_delta_file_round_trip_and_bad_files():
    layers = _layers()
    d = Deltas.create(layers, 3, seed=1)
    for p in d.parameters():
        p.data.normal_()
    back = Deltas.from_tensors(d.to_tensors(torch.float32), layers, "x.safetensors")
    assert back.rank == 3
    assert all(torch.equal(a, b) for a, b in zip(d.parameters(), back.parameters()))
    t = d.to_tensors()
    del t["layers.1.experts.0.up.b"]
    with pytest.raises(ModelFormatError, match=r"x\.safetensors.*layers\.1\.experts\.0\.up"):
        Deltas.from_tensors(t, layers, "x.safetensors")
    t = d.to_tensors()
    t["layers.0.shared.gate.a"] = torch.zeros(3, 9)
    with pytest.raises(ModelFormatError, match="layers.0.shared.gate.*expected"):
        Deltas.from_tensors(t, layers, "x.safetensors")


def test_delta_training_moves_the_experts_and_is_shipped(tiny, tmp_path,  # noqa: F811
                                                         monkeypatch):
    monkeypatch.setattr(build_default, "sha256_file", lambda p: "dense folder")  # not a GGUF
    run(tiny, tmp_path / "refit")
    rep = run(tiny, tmp_path / "delta", finetune_steps=4, delta_rank=2)
    assert rep["delta"]["rank"] == 2 and rep["finetune"]["experts"] is not None
    t = load_file(str(tmp_path / "delta" / FOLDER_DELTAS))
    assert any(k.startswith("refit_router.") for k in t)
    assert t["layers.0.shared.gate.a"].shape[0] == 2
    a, b = load_model(tmp_path / "refit"), load_model(tmp_path / "delta")
    key = "model.layers.0.mlp.shared.gate_proj.weight"
    assert not torch.equal(a.tensors[key], b.tensors[key])
    dest = tmp_path / "artifacts"
    export_artifacts(tmp_path / "delta", tiny / "dense", dest)
    shipped = load_file(str(dest / DELTAS))
    assert "router.embed_rows" in shipped and "layers.0.shared.gate.b" in shipped
    # the shipped router is the one the refit was routed by (the pull reruns the refit with it)
    refit_router = load_file(str(dest / ROUTER))
    keys = [k for k in refit_router if not k.startswith("router.embed")]
    assert keys and all(torch.equal(refit_router[k], t[f"refit_{k}"]) for k in keys)
    assert any(not torch.equal(refit_router[k], shipped[k]) for k in keys)  # router rounds ran
    export_artifacts(tmp_path / "refit", tiny / "dense", dest)  # no deltas: the file goes
    assert not (dest / DELTAS).exists()


@pytest.mark.parametrize("kw, match", [
    (dict(delta_rank=2), "finetune_steps is 0"),
    (dict(delta_rank=-1, finetune_steps=2), "delta_rank"),
])
def test_bad_delta_arguments(tiny, tmp_path, kw, match):  # noqa: F811
    with pytest.raises(DataError, match=match):
        run(tiny, tmp_path / "bad", **kw)


def test_build_default_adds_the_shipped_deltas_after_the_refit(tiny, tmp_path,  # noqa: F811
                                                                monkeypatch):
    import json
    import shutil

    from edge_readme.refactor.build_default import META

    monkeypatch.setattr(build_default, "sha256_file", lambda p: "dense folder")
    run(tiny, tmp_path / "delta", finetune_steps=4, delta_rank=2, seq_len=16,
        sequences_per_domain=2)
    with_deltas = tmp_path / "art"
    export_artifacts(tmp_path / "delta", tiny / "dense", with_deltas)
    meta = json.loads((with_deltas / META).read_text())
    meta["refactor"]["sequences_per_domain"] = 1  # the pull's refit on the builtin corpus
    (with_deltas / META).write_text(json.dumps(meta))
    plain = tmp_path / "plain"
    shutil.copytree(with_deltas, plain)
    (plain / DELTAS).unlink()
    a = load_model(build_default.build_default(tiny / "dense", tmp_path / "a", progress=False,
                                               artifacts=plain))
    b = load_model(build_default.build_default(tiny / "dense", tmp_path / "b", progress=False,
                                               artifacts=with_deltas))
    t = load_file(str(with_deltas / DELTAS))
    key = "model.layers.1.mlp.shared.up_proj.weight"
    want = (t["layers.1.shared.up.b"].float() @ t["layers.1.shared.up.a"].float())
    assert torch.allclose(b.tensors[key].float() - a.tensors[key].float(), want, atol=2e-3)
    keys = [k for k in a.tensors if k.startswith("router.") and k != "router.embed"]
    assert any(not torch.equal(a.tensors[k], b.tensors[k]) for k in keys)  # the tuned router
