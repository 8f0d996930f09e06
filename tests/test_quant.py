"""Weight formats: exact 4-bit packing, kept GGUF grids, q4 expert blobs, byte accounting."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from edge_readme import quant
from edge_readme.errors import EdgeReadmeError, ModelFormatError
from edge_readme.experts_format import read_manifest, write_experts
from edge_readme.loader import load_model
from edge_readme.quant import Q4Weight, q4
from edge_readme.quant import experts as qe
from edge_readme.runtime import Runtime, RuntimeOptions, dry_run_plan
from tests.tiny_models import write_moe

CPU = torch.device("cpu")


def _gguf_q(w: torch.Tensor, qtype) -> torch.Tensor:
    """w as a GGUF file of `qtype` holds it, dequantized to float32."""
    raw = gguf.quants.quantize(w.numpy(), qtype)
    return torch.from_numpy(np.array(gguf.quants.dequantize(raw, qtype))).view(w.shape).float()


def test_pack_matches_the_cpu_kernels_own_packing_and_unpacks():
    q = torch.randint(0, 16, (128, 96), generator=torch.Generator().manual_seed(0))
    ours = q4.pack(q)
    theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    assert torch.equal(ours, theirs)
    assert torch.equal(q4.unpack(ours), q.to(torch.uint8))


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.Q4_0,
                                   gguf.GGMLQuantizationType.Q4_1])
def test_gguf_4bit_values_are_kept_exactly(qtype):
    w = _gguf_q(torch.randn(128, 576, generator=torch.Generator().manual_seed(1)), qtype)
    q = Q4Weight.quantize(w)
    assert torch.equal(q.dequantize(), w)
    assert q4.on_grid(w)
    x = torch.randn(2, 576)
    assert torch.allclose(q(x), x @ w.t(), rtol=1e-5, atol=1e-4)  # float32 activations


def test_float_matrices_get_a_fit_no_worse_than_min_max():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    g = w.view(64, -1, 32)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = (hi - lo) / 15
    minmax = (((g - lo) / s).round() * s + lo).view_as(w)
    ours = Q4Weight.quantize(w).dequantize()
    assert not q4.on_grid(w)
    assert (ours - w).pow(2).sum() <= (minmax - w).pow(2).sum()


def test_q4_expert_blob_keeps_gguf_gate_up_and_runs_in_the_kernel():
    R, D = 64, 128
    gen = torch.Generator().manual_seed(3)
    gate_up = _gguf_q(torch.randn(2 * R, D, generator=gen), gguf.GGMLQuantizationType.Q4_1)
    down = torch.randn(D, R, generator=gen)
    lay = qe.Layout(R, D)
    blob = qe.encode(gate_up, down)
    assert blob.numel() == lay.nbytes == 15 * R * D // 8  # 0.625 bytes a weight
    assert qe.Layout.rows_of(lay.nbytes, D) == R
    views = lay.views(blob)
    gu, dn = qe.dequantize(views)
    assert torch.equal(gu, gate_up)
    assert ((dn - down).norm() / down.norm()) < 0.1
    sz = torch.empty(lay.scale_zero_numel(), dtype=torch.float32)
    wgu, wdn = qe.weights(views, qe.scale_zero_into(views, sz))
    x = torch.randn(3, D)
    assert torch.allclose(wgu(x), x @ gu.t(), rtol=1e-5, atol=1e-4)
    h = torch.randn(3, R)
    assert torch.allclose(wdn(h), h @ dn.t(), rtol=1e-5, atol=1e-4)


def test_q4_experts_file_is_validated_against_its_manifest(tmp_path):
    experts = {(0, 0): torch.randn(3, 40, 64), (0, 1): torch.randn(3, 24, 64)}
    write_experts(tmp_path, experts, "q4")
    m = read_manifest(tmp_path)
    assert m.expert_format == "q4" and {e.rows for e in m.entries} == {64, 32}  # padded to 32
    import json

    data = json.loads((tmp_path / "experts.json").read_text())
    data["dtype"] = "float16"  # the manifest now disagrees with the file's format
    (tmp_path / "experts.json").write_text(json.dumps(data))
    with pytest.raises(ModelFormatError, match="expected length"):
        read_manifest(tmp_path)


def test_q4_needs_a_hidden_size_the_kernel_takes(tmp_path):
    with pytest.raises(ModelFormatError, match="multiple of 64"):
        write_experts(tmp_path, {(0, 0): torch.randn(3, 32, 32)}, "q4")


@pytest.mark.parametrize("fmt", ["q4", "q8", "f32", "bf16"])
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_the_plan_counts_exactly_what_is_built(tmp_path, fmt, kind):
    folder = write_moe(tmp_path / "m", dtype="q4" if kind == "moe" else torch.float32)
    if kind == "dense":
        from tests.tiny_models import tiny_config, tiny_tensors, write_hf

        c = tiny_config()
        write_hf(tmp_path / "d", c, tiny_tensors(c))
        folder = tmp_path / "d"
    plan = dry_run_plan(str(folder), {"device": "cpu", "weights": fmt, "context_length": 64})
    rt = Runtime(load_model(folder), RuntimeOptions(device="cpu", weights=fmt,
                                                    context_length=64))
    try:
        router = 0 if rt.router is None else sum(
            t.nbytes for t in list(rt.router.parameters()) + list(rt.router.buffers())
            + list(rt.router_cache.buffers()))
        assert rt.model.weight_bytes() + router == plan["dense_bytes"]
        assert rt.resident_bytes() <= plan["all_resident_bytes"]
        assert plan["weights"] == fmt
    finally:
        rt.close()


def test_bad_formats_are_refused_with_the_choices():
    with pytest.raises(EdgeReadmeError, match="q4, q8, bf16, f16, f32"):
        quant.parse_format("q3")
    with pytest.raises(EdgeReadmeError, match="MPS"):
        quant.check_device("q4", torch.device("mps"))
    with pytest.raises(EdgeReadmeError, match="CPU only"):
        quant.check_device("q8", torch.device("mps"))
    assert quant.parse_format("int8") == "q8"
