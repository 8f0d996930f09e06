"""The batched decode step: sequences decoded together get the bits they get alone.

`decode_attention` runs every decoding sequence of a step in one call, padded to the longest;
its result for each sequence must be bit-for-bit its result alone, whatever the batch, the
lengths (below a CPU vector too) or the padding, or batched tokens would drift from solo ones."""

from __future__ import annotations

import random

import pytest
import torch

from edge_readme.model import KVCache, Segment, build_transformer, decode_attention, key_span
from tests.tiny_models import tiny_config, tiny_tensors


@pytest.mark.parametrize("context", [8, 20, 512, 2048])
def test_a_padded_batch_gives_each_sequence_its_solo_attention(context):
    rng, g = random.Random(context), torch.Generator().manual_seed(context)
    H, Hkv, hd = 9, 3, 64
    for _ in range(25):
        B = rng.randint(2, 8)
        lengths = [rng.randint(1, context) for _ in range(B)]
        if rng.random() < 0.5:  # short sequences: fewer keys than one vector of floats
            lengths = [rng.randint(1, min(15, context)) for _ in range(B)]
        keys = torch.randn(B, Hkv, context, hd, generator=g).to(torch.bfloat16)
        values = torch.randn(B, Hkv, context, hd, generator=g).to(torch.bfloat16)
        q = torch.randn(B, H, hd, generator=g)
        n = max(key_span(context, L) for L in lengths)
        together = decode_attention(q, keys[:, :, :n], values[:, :, :n], lengths)
        for b, L in enumerate(lengths):
            m = key_span(context, L)
            alone = decode_attention(q[b:b + 1], keys[b:b + 1, :, :m], values[b:b + 1, :, :m],
                                     [L])
            assert torch.equal(together[b], alone[0]), (lengths, b)


def test_padding_past_a_length_is_ignored():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 9, 64, generator=g)
    keys, values = torch.randn(2, 1, 3, 40, 64, generator=g)
    full = decode_attention(q, keys[:, :, :16], values[:, :, :16], [16])
    keys[:, :, 16:], values[:, :, 16:] = float("nan"), 1e30  # whatever sits past the length
    assert torch.equal(full, decode_attention(q, keys, values, [16]))
    ref = torch.softmax((q.view(3, 3, 64) @ keys[0, :, :16].transpose(1, 2)) * 64 ** -0.5, -1)
    torch.testing.assert_close(full.view(3, 3, 64), ref @ values[0, :, :16])


@pytest.mark.parametrize("pooled,order", [(True, [0, 1, 2, 3, 4]), (True, [4, 0, 2, 1, 3]),
                                          (False, [0, 1, 2, 3, 4])])
@pytest.mark.parametrize("weights", ["q4", "q8"])  # f32: MKL rounds rows by batch size
def test_a_ragged_step_gives_each_sequence_its_solo_logits(pooled, order, weights):
    """Decodes (batched attention), a prompt chunk and a one-token prompt in one forward pass,
    with the caches in one pool (slots in order: a view; out of order: a gather) or apart
    (stacked): each sequence's logits equal its logits run alone, bit for bit."""
    c = tiny_config()
    model = build_transformer(c, tiny_tensors(c), "cpu", torch.float32, rope_length=64,
                              weights=weights)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, c.vocab_size, (n,), generator=g) for n in (3, 20, 9, 1, 5)]
    nxt = [int(t) for t in torch.randint(0, c.vocab_size, (5,), generator=g)]
    dtype = torch.bfloat16  # the q4/q8 KV cache on a CPU with bfloat16 kernels
    with torch.inference_mode():
        solo = []
        for p, t in zip(prompts, nxt):
            cache = KVCache(c, 64, dtype=dtype)
            model(p, cache, 0)
            solo.append(model(torch.tensor([t]), cache, len(p))[0])
        caches = (KVCache.pool(c, 5, 64, dtype=dtype) if pooled
                  else [KVCache(c, 64, dtype=dtype) for _ in range(5)])
        caches = [caches[i] for i in order]
        for p, cache in zip(prompts[:3], caches):
            model(p, cache, 0)
        # sequences 0-2 decode; 3 and 4 read their prompts in the same pass
        work = [[nxt[0]], [nxt[1]], [nxt[2]], prompts[3].tolist(), prompts[4].tolist()]
        segs, start = [], 0
        for i, toks in enumerate(work):
            segs.append(Segment(caches[i], len(prompts[i]) if i < 3 else 0, start, len(toks)))
            start += len(toks)
        out = model(torch.tensor([t for w in work for t in w]), segs, 0)
        for i in range(3):
            assert torch.equal(out[i], solo[i]), i
        alone = [model(prompts[i], KVCache(c, 64, dtype=dtype), 0)[0] for i in (3, 4)]
        assert torch.equal(out[3], alone[0]) and torch.equal(out[4], alone[1])
