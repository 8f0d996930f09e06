import json
import os

import pytest
import torch
from safetensors import safe_open

from edge_readme.cache.store import ExpertStore, aligned_empty
from edge_readme.errors import ExpertFileError, ModelFormatError
from edge_readme.experts_format import ALIGNMENT, read_manifest, write_experts
from tests.moe_fixture import make_experts, write_fixture


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_round_trip_plain_safetensors(tmp_path, dtype):
    manifest, experts = write_fixture(tmp_path, dtype)
    assert manifest["dtype"] == str(dtype).removeprefix("torch.")
    with safe_open(tmp_path / "experts.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "edge-readme-experts/1"}
        for (layer, expert), t in experts.items():
            got = f.get_tensor(f"layers.{layer}.experts.{expert}")
            assert got.dtype == dtype and torch.equal(got, t)
    m = read_manifest(tmp_path)
    assert (m.num_layers, m.num_experts, m.hidden_size, m.dtype) == (3, 4, 32, dtype)
    assert sorted(m.keys()) == sorted(experts)


def test_offsets_aligned_and_files_atomic(tmp_path):
    write_fixture(tmp_path)
    m = read_manifest(tmp_path)
    assert all(e.offset % ALIGNMENT == 0 for e in m.entries)
    assert m.path.stat().st_size % ALIGNMENT == 0
    assert sorted(os.listdir(tmp_path)) == ["experts.json", "experts.safetensors"]


def test_writer_converts_dtype_and_checks_shape(tmp_path):
    experts = make_experts(dtype=torch.float32)
    write_experts(tmp_path, experts, "bfloat16")
    with safe_open(tmp_path / "experts.safetensors", framework="pt") as f:
        assert torch.equal(f.get_tensor("layers.1.experts.2"), experts[(1, 2)].bfloat16())
    with pytest.raises(ModelFormatError, match=r"layer 0 expert 0.*\[3, rows, 8\]"):
        write_experts(tmp_path, {(0, 0): torch.zeros(2, 4, 8)}, torch.float32)
    with pytest.raises(ModelFormatError, match="int8"):
        write_experts(tmp_path, experts, torch.int8)


def test_truncated_file_names_layer_and_expert(tmp_path):
    write_fixture(tmp_path)
    path = tmp_path / "experts.safetensors"
    last = read_manifest(tmp_path).entries[-1]
    os.truncate(path, last.offset + 10)
    with pytest.raises(ExpertFileError, match=r"layer 2 expert 3: truncated") as info:
        read_manifest(tmp_path)
    assert (info.value.layer, info.value.expert) == (2, 3)
    assert "experts.safetensors" in str(info.value)


def test_missing_files(tmp_path):
    with pytest.raises(ModelFormatError, match="experts.json: file not found"):
        read_manifest(tmp_path)
    write_fixture(tmp_path)
    os.remove(tmp_path / "experts.safetensors")
    with pytest.raises(ExpertFileError, match=r"experts.safetensors: file not found.*layer 0"):
        read_manifest(tmp_path)


def _edit_manifest(tmp_path, edit):
    path = tmp_path / "experts.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda d: d.update(format="x/2"), "field 'format'"),
        (lambda d: d.update(hidden_size="32"), "field 'hidden_size'"),
        (lambda d: d["experts"][5].update(offset=d["experts"][5]["offset"] + 8), "not aligned"),
        (lambda d: d["experts"][5].update(rows=3), "expected length"),
        (lambda d: d["experts"][5].update(layer=9), "out of range"),
        (lambda d: d["experts"][5].pop("sha256"), r"experts\[5\]"),
        (lambda d: d.update(dtype="float32"), "tensor 'layers.1.experts.1'|expected length"),
        (lambda d: d["experts"].append(d["experts"][0]), "listed twice"),
    ],
)
def test_hostile_manifest(tmp_path, edit, pattern):
    write_fixture(tmp_path)
    _edit_manifest(tmp_path, edit)
    with pytest.raises(ModelFormatError, match=pattern):
        read_manifest(tmp_path)


def test_hostile_safetensors_header(tmp_path):
    write_fixture(tmp_path)
    with open(tmp_path / "experts.safetensors", "r+b") as f:
        f.write(b"\xff" * 8)
    with pytest.raises(ModelFormatError, match="header length"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("cold", [False, True])
def test_read_into_exact_bytes(tmp_path, cold):
    _, experts = write_fixture(tmp_path, torch.float32)
    m = read_manifest(tmp_path)
    with ExpertStore(m, verify=True, cold=cold) as store:
        assert store.mode == ("direct" if cold else "cached") or store.mode == "fadvise"
        buf = aligned_empty(ExpertStore.buffer_bytes(m))
        for e in m.entries:
            n = store.read_into(e.layer, e.expert, buf)
            got = buf[:n].view(torch.float32).view(3, e.rows, m.hidden_size)
            assert torch.equal(got, experts[e.key])
        assert store.reads == len(m.entries)
        assert store.bytes_read == sum(e.length for e in m.entries)
        assert store.read_seconds > 0


def test_read_into_unaligned_buffer_in_cold_mode(tmp_path):
    _, experts = write_fixture(tmp_path, torch.float32)
    m = read_manifest(tmp_path)
    with ExpertStore(m, cold=True) as store:
        buf = aligned_empty(m.max_length + 1)[1:]
        n = store.read_into(0, 1, buf)
        got = buf[:n].clone().view(torch.float32).view(experts[(0, 1)].shape)
        assert torch.equal(got, experts[(0, 1)])
        store.drop_page_cache()


def test_bad_checksum_names_layer_and_expert(tmp_path):
    write_fixture(tmp_path)
    m = read_manifest(tmp_path)
    e = m.entry(1, 2)
    with open(m.path, "r+b") as f:
        f.seek(e.offset + 5)
        f.write(b"\x00\x01\x02")
    buf = aligned_empty(ExpertStore.buffer_bytes(m))
    with ExpertStore(m, verify=False) as store:
        store.read_into(1, 2, buf)
    with ExpertStore(m, verify=True) as store:
        with pytest.raises(ExpertFileError, match=r"layer 1 expert 2: sha256") as info:
            store.read_into(1, 2, buf)
    assert (info.value.layer, info.value.expert) == (1, 2)


def test_short_read_after_open(tmp_path):
    write_fixture(tmp_path)
    m = read_manifest(tmp_path)
    e = m.entry(2, 3)
    buf = aligned_empty(ExpertStore.buffer_bytes(m))
    with ExpertStore(m) as store:
        os.truncate(m.path, e.offset + 100)
        pattern = rf"layer 2 expert 3.*expected {e.length} bytes, got 100"
        with pytest.raises(ExpertFileError, match=pattern):
            store.read_into(2, 3, buf)
        store.read_into(0, 0, buf)


def test_buffer_too_small_and_unknown_expert(tmp_path):
    write_fixture(tmp_path)
    m = read_manifest(tmp_path)
    with ExpertStore(m) as store:
        with pytest.raises(ValueError, match="buffer"):
            store.read_into(0, 0, torch.empty(8, dtype=torch.uint8))
        with pytest.raises(ExpertFileError, match="layer 7 expert 0 is not listed"):
            store.read_into(7, 0, aligned_empty(ExpertStore.buffer_bytes(m)))


def test_aligned_empty():
    t = aligned_empty(5000)
    assert t.numel() == 5000 and t.data_ptr() % ALIGNMENT == 0 and t.dtype == torch.uint8
