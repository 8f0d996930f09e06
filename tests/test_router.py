"""The pre-gating router: incremental decoding with its KV cache equals full recompute."""

import pytest
import torch

from edge_readme.config import RouterConfig
from edge_readme.errors import ModelFormatError
from edge_readme.router import Router, router_tensor_names

CFG = RouterConfig(dim=16, num_layers=2, num_heads=2, ffn_dim=32, max_position=64)


def make(routing="global", layers=3, experts=4):
    emb = torch.randn(50, 24)
    return Router.init_from_embedding(CFG, emb, experts, layers, routing, seed=1), emb


@pytest.mark.parametrize("routing", ["global", "per_layer"])
def test_incremental_equals_full(routing):
    r, _ = make(routing)
    ids = torch.randint(0, 50, (20,))
    full = r(ids)
    cache = r.new_cache(32)
    parts = [r(ids[:7], cache, 0)] + [r(ids[i:i + 1], cache, i) for i in range(7, 12)]
    parts.append(r(ids[12:], cache, 12))
    torch.testing.assert_close(torch.cat(parts), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.forward_batch(ids[None])[0], full, rtol=1e-5, atol=1e-5)


def test_route_shapes_and_global_repeat():
    r, _ = make("global", layers=3)
    path = r.route(torch.tensor([1, 2, 3]))
    assert path.shape == (3, 3) and path.dtype == torch.long
    assert (path == path[:, :1]).all()
    r2, _ = make("per_layer", layers=3)
    assert r2(torch.tensor([1, 2]), r2.new_cache(4), 0).shape == (2, 3, 4)
    assert r2.route(torch.tensor([1, 2])).shape == (2, 3)


def test_embedding_starts_from_backbone_columns():
    r, emb = make()
    ratio = r.embed[:, :16] / emb[:, :16]
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0, 0].item()))


def test_state_round_trip():
    r, _ = make("per_layer")
    t = r.state_tensors()
    assert sorted(t) == sorted(router_tensor_names(CFG))
    r2 = Router.from_tensors(CFG, 4, 3, "per_layer", t)
    ids = torch.randint(0, 50, (9,))
    torch.testing.assert_close(r2(ids), r(ids))


def test_from_tensors_rejects_mismatch():
    r, _ = make()
    t = r.state_tensors()
    with pytest.raises(ModelFormatError, match="wrong shapes"):
        Router.from_tensors(CFG, 5, 3, "global", t)
    del t["router.norm"]
    with pytest.raises(ModelFormatError, match="missing"):
        Router.from_tensors(CFG, 4, 3, "global", t)


def test_cache_overflow_is_an_error():
    r, _ = make()
    with pytest.raises(ValueError, match="holds 4"):
        r(torch.tensor([1, 2, 3]), r.new_cache(4), 2)
