"""The batched decode step: sequences decoded together get the bits they get alone.

`decode_attention` runs every decoding sequence of a step in one call, padded to the longest;
its result for each sequence must be bit-for-bit its result alone, whatever the batch, the
lengths (below a CPU vector too) or the padding, or batched tokens would drift from solo ones."""

from __future__ import annotations

import random

import pytest
import torch

from edge_readme.model import decode_attention, key_span


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
