"""Dense -> MoE refactoring on a tiny random Llama: masks, writer, end to end, resume, bad input."""


import pytest
import torch
from safetensors import safe_open

from edge_readme.config import RouterConfig
from edge_readme.errors import DataError
from edge_readme.experts_format import read_manifest
from edge_readme.loader import load_model
from edge_readme.refactor import calibrate
from edge_readme.refactor import functional as fn
from edge_readme.refactor.allocate import allocate
from edge_readme.refactor.corpus import load_user_data
from edge_readme.refactor.evaluate import evaluate, open_moe, seq_logits
from edge_readme.refactor.masks import build_masks
from edge_readme.refactor.pipeline import refactor
from tests.tiny_models import REFACTOR_WORDS as WORDS
from tests.tiny_models import write_refactor_fixture

ROUTER = RouterConfig(dim=16, num_layers=1, num_heads=2, ffn_dim=32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_refactor_fixture(tmp_path_factory.mktemp("tiny"))


def run(tiny, out, **kw):
    args = dict(data=[tiny / "data.jsonl"], seq_len=32, sequences_per_domain=4, router_steps=10,
                cache_dir=tiny / "cache", router_config=ROUTER, progress=False)
    args.update(kw)
    return refactor(tiny / "dense", out, **args)


def test_masks_on_hand_built_statistics():
    # 2 domains, 1 layer, 6 neurons: domain 0 prefers 0,1,2; domain 1 prefers 1,2,3
    stats = torch.tensor([[[9., 8., 7., 1., 0., 0.]], [[0., 8., 7., 9., 1., 0.]]])
    m = build_masks(stats, 0.5)
    assert m.shared[0].tolist() == [1, 2]
    assert [x.tolist() for x in m.experts[0]] == [[0], [3]]
    full = build_masks(stats, 1.0)  # all neurons shared: placeholder rows, zeroed downs
    assert full.shared[0].tolist() == list(range(6))
    assert all(len(x) == 1 for x in full.experts[0])


def test_allocation_spends_rows_on_costly_layers():
    rows = allocate([1.0, 0.01, 0.1, 0.1], 0.5, 100)
    assert sum(rows) == 200  # the mean is the asked fraction, exactly
    assert rows[0] > max(rows[2:]) and min(rows[2:]) > rows[1] >= 30 and rows[0] <= 99
    assert abs(rows[2] - rows[3]) <= 1  # equal costs, equal shares (up to the rounding)
    assert allocate([0.2, 0.2, 0.2], 0.5, 100) == [50, 50, 50]
    noisy = allocate([0.5, -0.01, 0.3], 0.75, 64)  # a cost <= 0 (noise) puts its layer at 30%
    assert noisy[1] == int(0.3 * 64) and sum(noisy) == 3 * 48 and max(noisy) <= 63
    assert allocate([0.5, 0.1], 1.0, 64) == [64, 64]


def test_masks_with_per_layer_rows():
    stats = torch.rand(3, 2, 40)
    m = build_masks(stats, 0.5, rows=[30, 10])
    for i, keep in enumerate([30, 10]):
        assert all(len(m.shared[i]) + len(x) == keep for x in m.experts[i])
        want = stats[1, i].topk(keep).indices.sort().values
        assert torch.cat([m.shared[i], m.experts[i][1]]).sort().values.tolist() == want.tolist()


def test_end_to_end_writes_a_loadable_moe(tiny, tmp_path):
    out = tmp_path / "moe"
    rep = run(tiny, out)
    assert 0 <= rep["router_accuracy"] <= 1
    assert len(rep["layer_rows"]) == 2 and rep["allocation"] == "sensitivity"
    assert rep["params"]["active_ffn_fraction"] == pytest.approx(0.5, abs=1e-9)
    uniform = run(tiny, tmp_path / "uniform", allocation="uniform")
    assert uniform["params"]["active_ffn_fraction"] == 0.5 and "layer_rows" not in uniform
    for name in ("model.safetensors", "experts.safetensors", "masks.safetensors"):
        with safe_open(str(out / name), framework="pt") as f:
            assert list(f.keys())
    with safe_open(str(out / "masks.safetensors"), framework="pt") as f:
        assert f.get_tensor("layers.0.shared").dtype == torch.int32
    loaded = load_model(out)
    assert loaded.config.moe.num_experts == 3 and loaded.chat_template
    assert any(k.startswith("router.") for k in loaded.tensors)
    assert "model.layers.0.mlp.shared.gate_proj.weight" in loaded.tensors
    assert read_manifest(out).num_experts == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_per_layer_routing_end_to_end(tiny, tmp_path):
    rep = run(tiny, tmp_path / "pl", routing="per_layer")
    assert len(rep["layer_rows"]) == 2 and 0 <= rep["router_accuracy"] <= 1
    loaded, model, router, masks = open_moe(tmp_path / "pl")
    assert loaded.config.moe.routing == "per_layer"
    assert router.route(torch.arange(10)).shape == (10, 2)  # a path: one expert per layer


def test_runtime_moe_matches_functional_twin(tiny, tmp_path):
    out = tmp_path / "moe"
    run(tiny, out, recovery="none")
    loaded, model, router, masks = open_moe(out)
    dense = load_model(tiny / "dense")
    bb = fn.Backbone.create(dense.config, dense.tensors, 32)
    layers = [fn.slice_layer(bb, i, masks.shared[i], masks.experts[i]) for i in range(2)]
    ids = torch.randint(0, dense.config.vocab_size, (20,))
    route = router.route(ids)
    want = fn.moe_forward(bb, layers, ids[None], route[None])[0]
    torch.testing.assert_close(seq_logits(model, ids, route), want, rtol=2e-2, atol=2e-2)


def test_refit_improves_on_masks_alone(tiny, tmp_path):
    docs = load_user_data([tiny / "data.jsonl"])
    kw = dict(seq_len=32, sequences_per_domain=2, progress=False)
    run(tiny, tmp_path / "none", recovery="none")
    run(tiny, tmp_path / "refit", recovery="refit")
    a = evaluate(tmp_path / "none", docs, tiny / "dense", **kw)["mean_ratio"]
    b = evaluate(tmp_path / "refit", docs, tiny / "dense", **kw)["mean_ratio"]
    assert b < a


def test_finetune_distils_on_all_the_training_text(tiny, tmp_path, monkeypatch):
    from edge_readme.refactor import train
    seen = {}
    original = train.finetune

    def spy(bb, layers, router, seqs, *a, **kw):
        seen["calibration"], seen["experts"] = len(seqs), len(kw["expert_seqs"])
        return original(bb, layers, router, seqs, *a, **kw)

    monkeypatch.setattr(train, "finetune", spy)
    rep = run(tiny, tmp_path / "ft", finetune_steps=3, sequences_per_domain=2)
    assert rep["finetune"]["experts"] is not None and rep["finetune"]["router"] is not None
    assert seen["experts"] > seen["calibration"] == 6  # 3 domains x 2 calibration sequences
    assert load_model(tmp_path / "ft").config.moe.num_experts == 3


def test_resume_from_cached_statistics(tiny, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    run(tiny, tmp_path / "a", cache_dir=cache)
    assert len(list(cache.glob("stats-*.safetensors"))) == 3

    def boom(*a, **k):
        raise AssertionError("statistics recomputed despite the cache")

    monkeypatch.setattr(calibrate, "mean_abs_activation", boom)
    run(tiny, tmp_path / "b", cache_dir=cache)


def test_kmeans_experts_for_unlabelled_data(tiny, tmp_path):
    rep = run(tiny, tmp_path / "k", experts=2)
    assert rep["domains"] == ["cluster0", "cluster1"]
    assert load_model(tmp_path / "k").config.moe.num_experts == 2


@pytest.mark.parametrize("kw,match", [
    (dict(active_fraction=0.0), "active fraction"),
    (dict(active_fraction=1.5), "active fraction"),
    (dict(experts=1), "at least 2 experts"),
    (dict(experts=100), "experts need at least"),
    (dict(recovery="magic"), "recovery"),
    (dict(allocation="magic"), "layer allocation"),
])
def test_bad_arguments(tiny, tmp_path, kw, match):
    with pytest.raises(DataError, match=match):
        run(tiny, tmp_path / "x", **kw)
    assert not (tmp_path / "x").exists()


def test_bad_data(tiny, tmp_path):
    with pytest.raises(DataError, match="not found"):
        run(tiny, tmp_path / "x", data=[tmp_path / "missing.txt"])
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="no text"):
        run(tiny, tmp_path / "x", data=[empty])
    one = tmp_path / "one.txt"
    one.write_text(" ".join(WORDS["code"] * 40))
    with pytest.raises(DataError, match="one domain"):
        run(tiny, tmp_path / "x", data=[one])
    assert not (tmp_path / "x").exists()


def test_existing_target_needs_force(tiny, tmp_path):
    out = tmp_path / "moe"
    out.mkdir()
    (out / "keep").write_text("old")
    with pytest.raises(DataError, match="already exists"):
        run(tiny, out)
    assert (out / "keep").exists()
    run(tiny, out, force=True)
    assert not (out / "keep").exists() and (out / "config.json").exists()
