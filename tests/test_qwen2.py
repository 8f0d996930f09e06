"""The qwen2 architecture (Llama plus q/k/v biases) on tiny random models: GGUF and Hugging Face
folders load to the same weights, the forward pass matches an independent float64 reference of
Hugging Face's Qwen2 math, and the refactoring's functional twin agrees with model.py."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from edge_readme.config import ModelConfig
from edge_readme.errors import ModelFormatError
from edge_readme.loader import load_model
from edge_readme.model import KVCache, build_transformer
from tests.tiny_models import tiny_config, tiny_tensors, write_gguf, write_hf


def qwen2_config(**kw) -> ModelConfig:
    return tiny_config(architecture="qwen2", attention_bias=True, rms_eps=1e-6,
                       rope_theta=1e6, **kw)


def qwen2_tensors(c: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    t = tiny_tensors(c, seed)
    g = torch.Generator().manual_seed(seed + 7)
    for i in range(c.num_layers):
        for n, rows in (("q", c.q_dim), ("k", c.kv_dim), ("v", c.kv_dim)):
            t[f"model.layers.{i}.self_attn.{n}_proj.bias"] = torch.randn(rows, generator=g)
    return t


def reference_logits(c: ModelConfig, t: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """Hugging Face Qwen2 math written out plainly in float64 (rotate-half RoPE, GQA, biases)."""
    d = {k: v.double() for k, v in t.items()}
    T, hd = len(ids), c.head_dim

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_eps) * w

    inv = 1.0 / c.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(x):  # [T, H, hd]
        rot = torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1)
        return x * cos[:, None] + rot * sin[:, None]

    x = d["model.embed_tokens.weight"][ids]
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        h = norm(x, d[p + "input_layernorm.weight"])
        q, k, v = (h @ d[p + f"self_attn.{n}_proj.weight"].T + d[p + f"self_attn.{n}_proj.bias"]
                   for n in "qkv")
        q, k = rope(q.view(T, c.num_heads, hd)), rope(k.view(T, c.num_kv_heads, hd))
        v = v.view(T, c.num_kv_heads, hd)
        rep = c.num_heads // c.num_kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        att = torch.einsum("thd,shd->hts", q, k) / hd ** 0.5 + mask
        o = torch.einsum("hts,shd->thd", att.softmax(-1), v).reshape(T, -1)
        x = x + o @ d[p + "self_attn.o_proj.weight"].T
        h = norm(x, d[p + "post_attention_layernorm.weight"])
        act = torch.nn.functional.silu(h @ d[p + "mlp.gate_proj.weight"].T) * \
            (h @ d[p + "mlp.up_proj.weight"].T)
        x = x + act @ d[p + "mlp.down_proj.weight"].T
    x = norm(x, d["model.norm.weight"])
    return x @ d.get("lm_head.weight", d["model.embed_tokens.weight"]).T


def ours(loaded, ids: list[int]) -> torch.Tensor:
    m = build_transformer(loaded.config, loaded.tensors, "cpu", torch.float32)
    with torch.inference_mode():
        return m(torch.tensor(ids), KVCache(loaded.config, 32), 0, all_logits=True).double()


IDS = [5, 70, 33, 120, 9, 260, 41, 88, 17, 200]


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_and_hf_folder_match_the_reference(tmp_path, tied):
    c = qwen2_config(tie_embeddings=tied)
    t = qwen2_tensors(c)
    want = reference_logits(c, t, IDS)
    g = load_model(write_gguf(tmp_path / "q.gguf", c, t, arch="qwen2"))
    h = load_model(write_hf(tmp_path / "hf", c, t))
    for loaded in (g, h):
        assert loaded.config.architecture == "qwen2" and loaded.config.attention_bias
        assert loaded.config.tie_embeddings is tied
        assert loaded.config.rms_eps == pytest.approx(1e-6) and loaded.config.rope_theta == 1e6
        torch.testing.assert_close(ours(loaded, IDS), want, atol=2e-4, rtol=1e-4)
    # the biases matter: without them the logits move well past that tolerance
    no_bias = {k: (torch.zeros_like(v) if k.endswith(".bias") else v) for k, v in t.items()}
    assert (reference_logits(c, no_bias, IDS) - want).abs().max() > 1e-2


def test_hf_qwen2_config_json():
    d = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
         "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
         "num_attention_heads": 14, "num_key_value_heads": 2, "rope_theta": 1000000.0,
         "rms_norm_eps": 1e-06, "max_position_embeddings": 32768, "tie_word_embeddings": True,
         "use_sliding_window": False, "sliding_window": 32768, "bos_token_id": 151643,
         "eos_token_id": 151645}
    c = ModelConfig.from_hf_dict(d)
    assert (c.architecture, c.attention_bias, c.head_dim, c.rms_eps) == ("qwen2", True, 64, 1e-6)
    back = c.to_hf_dict()
    assert back["model_type"] == "qwen2" and back["architectures"] == ["Qwen2ForCausalLM"]
    assert ModelConfig.from_hf_dict(back) == c
    assert not ModelConfig.from_hf_dict({**d, "model_type": "llama"}).attention_bias
    with pytest.raises(ModelFormatError, match="model_type is 'gemma'"):
        ModelConfig.from_hf_dict({**d, "model_type": "gemma"})


def test_missing_bias_is_named(tmp_path):
    c = qwen2_config()
    t = qwen2_tensors(c)
    del t["model.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(ModelFormatError, match=r"model.layers.1.self_attn.k_proj.bias"):
        load_model(write_gguf(tmp_path / "q.gguf", c, t, arch="qwen2"))


def test_functional_twin_matches_model(tmp_path):
    """The refactoring computes with refactor/functional.py: it must add the biases too."""
    from edge_readme.refactor import functional as fn

    c = qwen2_config()
    loaded = load_model(write_hf(tmp_path / "hf", c, qwen2_tensors(c)))
    bb = fn.Backbone.create(loaded.config, loaded.tensors, 32)
    with torch.inference_mode():
        got = fn.dense_forward(bb, torch.tensor([IDS]))[0].double()
    torch.testing.assert_close(got, ours(loaded, IDS), atol=1e-4, rtol=1e-4)


def test_moe_folder_keeps_biases(tmp_path):
    """The dense part of a Read-ME folder written from a qwen2 backbone carries the biases."""
    from edge_readme.refactor import functional as fn
    from edge_readme.refactor.writer import dense_part

    c = qwen2_config()
    t = qwen2_tensors(c)
    bb = fn.Backbone.create(c, t, 32)
    idx = torch.arange(c.intermediate_size)
    layers = [fn.slice_layer(bb, i, idx[:32], [idx[32:64], idx[64:]]) for i in range(3)]
    part = dense_part(bb, layers, {}, torch.float32)
    assert all(f"model.layers.{i}.self_attn.{n}_proj.bias" in part for i in range(3) for n in "qkv")
    d = json.loads(json.dumps(dataclasses.replace(c, moe=None).to_hf_dict()))
    assert ModelConfig.from_hf_dict(d).attention_bias


def test_calibration_domain_subset():
    """A coding model's refactoring keeps the code, docs and conversation domains only."""
    from edge_readme.errors import DataError
    from edge_readme.refactor.pipeline import load_docs

    docs = load_docs(None, ["code", "docs", "conversation"])
    assert {d.domain for d in docs} == {"code", "docs", "conversation"}
    assert {d.split for d in docs} == {"train", "heldout"}
    with pytest.raises(DataError, match=r"\['rust'\] are not in the data"):
        load_docs(None, ["code", "rust"])


def test_refactored_qwen2_moe_runs_with_its_biases(tmp_path):
    """Dense qwen2 -> Read-ME MoE folder -> runtime model: equal to the functional twin (which
    adds the biases), and different from the same MoE with the biases dropped."""
    from safetensors.torch import load_file, save_file

    from edge_readme.config import RouterConfig
    from edge_readme.refactor.evaluate import open_moe, seq_logits
    from edge_readme.refactor.pipeline import refactor
    from tests.tiny_models import write_refactor_fixture

    root = write_refactor_fixture(tmp_path)
    cfg_path = root / "dense" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_type"] = "qwen2"
    cfg_path.write_text(json.dumps(cfg))
    w = load_file(str(root / "dense" / "model.safetensors"))
    g = torch.Generator().manual_seed(3)
    for name in [n for n in w if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))]:
        w[name.replace(".weight", ".bias")] = torch.randn(w[name].shape[0], generator=g)
    save_file(w, str(root / "dense" / "model.safetensors"))
    refactor(root / "dense", tmp_path / "moe", data=[root / "data.jsonl"], seq_len=32,
             sequences_per_domain=4, router_steps=10, cache_dir=root / "cache",
             router_config=RouterConfig(dim=16, num_layers=1, num_heads=2, ffn_dim=32),
             progress=False, recovery="none")
    loaded, model, router, masks = open_moe(tmp_path / "moe")
    assert loaded.config.architecture == "qwen2" and loaded.config.attention_bias
    from edge_readme.refactor import functional as fn

    dense = load_model(root / "dense")
    ids = torch.randint(0, dense.config.vocab_size, (20,))
    route = router.route(ids)

    def twin(tensors):
        bb = fn.Backbone.create(dense.config, tensors, 32)
        layers = [fn.slice_layer(bb, i, masks.shared[i], masks.experts[i]) for i in range(2)]
        return fn.moe_forward(bb, layers, ids[None], route[None])[0]

    got = seq_logits(model, ids, route)
    torch.testing.assert_close(got, twin(dense.tensors), rtol=2e-2, atol=2e-2)
    unbiased = twin({n: t for n, t in dense.tensors.items() if not n.endswith(".bias")})
    assert (got - unbiased).abs().max() > 0.1
