"""The dense backbone on tiny random models: incremental decode equals the full forward."""

from __future__ import annotations

import pytest
import torch

from edge_readme.errors import RequestError
from edge_readme.model import KVCache, build_transformer
from edge_readme.sampling import Sampler, SamplingParams
from tests.tiny_models import tiny_config, tiny_tensors


@pytest.mark.parametrize("tie", [True, False])
def test_incremental_decode_equals_full_forward(tie):
    c = tiny_config(tie_embeddings=tie)
    model = build_transformer(c, tiny_tensors(c), "cpu", torch.float32, rope_length=64)
    ids = torch.randint(0, c.vocab_size, (20,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model(ids, KVCache(c, 64), 0, all_logits=True)  # [T, V]
        cache = KVCache(c, 64)
        steps = [model(ids[:7], cache, 0, all_logits=True)]
        steps += [model(ids[i:i + 1], cache, i) for i in range(7, 13)]
        steps.append(model(ids[13:], cache, 13, all_logits=True))  # a chunk after decode steps
    torch.testing.assert_close(torch.cat(steps), full, rtol=1e-4, atol=1e-4)


def test_bfloat16_tracks_float32():
    c = tiny_config()
    t = tiny_tensors(c)
    ids = torch.arange(10)
    with torch.inference_mode():
        a = build_transformer(c, t, "cpu", torch.float32, 32)(ids, KVCache(c, 32), 0)
        b = build_transformer(c, t, "cpu", torch.bfloat16, 32)(
            ids, KVCache(c, 32, dtype=torch.bfloat16), 0)
    assert torch.argmax(a) == torch.argmax(b.float())


def test_sampler_greedy_and_seeded():
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0])
    assert Sampler(SamplingParams())(logits) == 1
    draws = [Sampler(SamplingParams(temperature=1.0, seed=7))(logits) for _ in range(3)]
    assert len(set(draws)) == 1
    assert Sampler(SamplingParams(temperature=5.0, top_k=1, seed=3))(logits) == 1
    assert Sampler(SamplingParams(temperature=5.0, top_p=0.01, seed=3))(logits) == 1


@pytest.mark.parametrize("kw", [{"temperature": -1}, {"top_p": 0}, {"top_k": -2},
                                {"temperature": "hot"}, {"seed": 1.5}])
def test_sampling_params_reject_nonsense(kw):
    with pytest.raises(RequestError):
        SamplingParams(**kw)


def _snap_q4_1(t: dict) -> dict:
    """The projections as a Q4_1 GGUF holds them (dequantized), as a real 4-bit model is."""
    import gguf

    q41 = gguf.GGMLQuantizationType.Q4_1
    return {k: torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(v.numpy(), q41), q41)
                                .copy()).view(v.shape) if k.endswith("proj.weight") else v
            for k, v in t.items()}


@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_quantized_weights_track_float32(fmt):
    from edge_readme.quant import Q4Weight, Q8Weight

    c = tiny_config()
    t = tiny_tensors(c)
    if fmt == "q4":
        t = _snap_q4_1(t)  # q4 keeps a 4-bit model's values: only the embedding is rounded
    ids = torch.arange(12)
    with torch.inference_mode():
        ref = build_transformer(c, t, "cpu", torch.float32, 32, weights="f32")
        q = build_transformer(c, t, "cpu", torch.float32, 32, weights=fmt)
        kind = Q4Weight if fmt == "q4" else Q8Weight
        assert isinstance(q.layers[0].attn.wqkv, kind)
        assert q.weight_bytes() < 0.45 * ref.weight_bytes()
        a = ref(ids, KVCache(c, 32), 0, all_logits=True)
        b = q(ids, KVCache(c, 32), 0, all_logits=True)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.75
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.98


def test_q4_keeps_a_4bit_matrix_exactly():
    from edge_readme.quant import Q4Weight

    c = tiny_config()
    t = _snap_q4_1(tiny_tensors(c))
    mlp = "model.layers.0.mlp."
    w = torch.cat([t[mlp + "gate_proj.weight"], t[mlp + "up_proj.weight"]])
    q = Q4Weight.quantize(w)
    assert torch.equal(q.dequantize(), w)
    x = torch.randn(3, w.shape[1])
    assert torch.allclose(q(x), x @ w.t(), atol=1e-5, rtol=1e-5)


def test_quantized_formats_pad_widths_the_kernels_cannot_take():
    from edge_readme.quant import Q8Weight

    c = tiny_config(intermediate_size=100)  # down_proj input width 100: not a multiple of 32
    t = tiny_tensors(c)
    model = build_transformer(c, t, "cpu", torch.float32, 32, weights="q8")
    ffn = model.layers[0].ffn
    assert isinstance(ffn.w_down, Q8Weight) and ffn.w_down.shape == (c.hidden_size, 128)
    ref = build_transformer(c, t, "cpu", torch.float32, 32, weights="f32")
    with torch.inference_mode():
        a = model(torch.arange(9), KVCache(c, 32), 0)  # a batch: no crash
        b = ref(torch.arange(9), KVCache(c, 32), 0)
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.95
